//! `mkctl restart NAME`: the instance is stopped and booted again by the
//! daemon — a new QEMU, a new kernel boot — and is ready and serves `exec`
//! when the command returns; a failed instance comes back the same way; an
//! unknown name stops nothing and fails with a message naming what exists.
//!
//! `restart = "on-failure"`: the daemon brings a killed instance back by
//! itself, counts it in the status, stops after `restart_limit` restarts
//! with the limit in the reason, and never restarts what `mkctl stop`
//! stopped.
//!
//! Boots a real kernel under QEMU: needs `scripts/setup.sh` (fails, never
//! skips, without it).

use std::time::{Duration, Instant};

use mkctl_e2e::{repo_root, Mkctl};

fn single() -> String {
    repo_root()
        .join("tests/configs/single.toml")
        .display()
        .to_string()
}

fn solo(m: &Mkctl) -> serde_json::Value {
    mkctl_e2e::instance_status(m, "solo")
}

/// The guest kernel's boot id: a new one for every boot.
fn boot_id(m: &Mkctl) -> String {
    m.run(&[
        "exec",
        "solo",
        "--",
        "cat",
        "/proc/sys/kernel/random/boot_id",
    ])
    .ok()
    .text()
    .trim()
    .to_string()
}

/// `tests/configs/single.toml` with `extra` added to its one instance (the
/// last table of the file), written into the test's scratch directory.
fn single_with(m: &Mkctl, extra: &str) -> String {
    let text = std::fs::read_to_string(single()).expect("read single.toml");
    let path = m.scratch.join("single-restart.toml");
    std::fs::write(&path, format!("{text}{extra}")).expect("write the topology");
    path.display().to_string()
}

/// Kills solo's QEMU with SIGKILL, as a crash would; returns its pid.
fn kill_qemu(m: &Mkctl) -> u64 {
    let pid = solo(m)["pid"].as_u64().expect("solo has a QEMU");
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    pid
}

/// Waits (at most `secs`) until solo's status satisfies `done`; returns it.
fn wait_for(
    m: &Mkctl,
    secs: u64,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = solo(m);
        if done(&s) {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "solo not {what} after {secs} s: {s}\n--- daemon log ---\n{}",
            std::fs::read_to_string(m.run_dir().join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn on_failure_brings_a_killed_instance_back_and_a_stop_is_no_failure() {
    let m = Mkctl::new("onfail");
    let config = single_with(&m, "restart = \"on-failure\"\n");
    m.run(&["boot", &config]).ok();
    let before = solo(&m);
    assert_eq!(before["state"], "ready");
    assert_eq!(before["restart"], "on-failure");
    assert_eq!(before["restart_limit"], 3, "the default limit: {before}");
    assert_eq!(before["restarts"], 0);
    let id = boot_id(&m);

    // Killed: failed first (the backoff is 1 s), then back by itself.
    let t = Instant::now();
    let old = kill_qemu(&m);
    let failed = wait_for(&m, 5, "failed", |s| s["state"] == "failed");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap_or("")
            .contains("qemu exited unexpectedly"),
        "{failed}"
    );
    let back = wait_for(&m, 90, "ready again", |s| {
        s["state"] == "ready" && s["pid"].as_u64().is_some_and(|p| p != old)
    });
    eprintln!("killed to ready again: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(back["restarts"], 1, "{back}");
    assert!(back["reason"].is_null(), "{back}");
    assert!(
        !std::path::Path::new(&format!("/proc/{old}")).exists(),
        "the old QEMU {old} is still there"
    );
    // A new kernel boot, and exec works in it.
    assert_ne!(boot_id(&m), id, "the guest kernel did not boot again");
    let out = m
        .run(&["exec", "solo", "--", "sh", "-c", "echo back; exit 3"])
        .text();
    assert_eq!(out.trim(), "back");
    let text = m.run(&["status"]).ok().text();
    assert!(text.contains("RESTARTS"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("solo ") && l.contains(" 1/3 ")),
        "{text}"
    );
    let log = std::fs::read_to_string(m.run_dir().join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("solo: restart 1 of 3 (restart = \"on-failure\")"),
        "{log}"
    );

    // A deliberate stop is not a failure: nothing brings it back.
    m.run(&["stop", "solo"]).ok();
    std::thread::sleep(Duration::from_secs(3));
    let stopped = solo(&m);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(stopped["restarts"], 1, "{stopped}");
    assert!(m.qemu_pids().is_empty(), "QEMU runs: {:?}", m.qemu_pids());

    m.run(&["daemon", "stop"]).ok();
    assert!(m.qemu_pids().is_empty(), "QEMU left: {:?}", m.qemu_pids());
}

/// A power-off asked for inside the guest is a stop, not a failure: the
/// instance is `stopped`, and the restart policy leaves it so.
#[test]
fn a_poweroff_inside_the_guest_is_no_failure() {
    let m = Mkctl::new("onfail-poweroff");
    let config = single_with(&m, "restart = \"on-failure\"\n");
    m.run(&["boot", &config]).ok();
    // busybox poweroff signals PID 1 (guest-init), which lets go of the
    // window and powers the machine off; the exec may lose its answer.
    let _ = m.run(&["exec", "solo", "--", "sh", "-c", "poweroff"]);
    let stopped = wait_for(&m, 30, "stopped", |s| s["state"] != "ready");
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    std::thread::sleep(Duration::from_secs(3));
    let still = solo(&m);
    assert_eq!(still["state"], "stopped", "restarted: {still}");
    assert_eq!(still["restarts"], 0, "{still}");
    assert!(m.qemu_pids().is_empty(), "QEMU runs: {:?}", m.qemu_pids());
    let log = std::fs::read_to_string(m.run_dir().join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("solo: powered off from inside the guest"),
        "{log}"
    );
}

#[test]
fn the_restart_limit_leaves_the_instance_failed_and_says_so() {
    let m = Mkctl::new("onfail-limit");
    let config = single_with(&m, "restart = \"on-failure\"\nrestart_limit = 1\n");
    m.run(&["boot", &config]).ok();

    let first = kill_qemu(&m);
    let back = wait_for(&m, 90, "ready again", |s| {
        s["state"] == "ready" && s["pid"].as_u64().is_some_and(|p| p != first)
    });
    assert_eq!(back["restarts"], 1, "{back}");
    assert_eq!(back["restart_limit"], 1, "{back}");

    // The second failure finds the limit spent: failed, and it stays so.
    kill_qemu(&m);
    let failed = wait_for(&m, 5, "failed", |s| s["state"] == "failed");
    std::thread::sleep(Duration::from_secs(3));
    let still = solo(&m);
    assert_eq!(still["state"], "failed", "{still}");
    assert!(still["pid"].is_null(), "{still}");
    assert!(m.qemu_pids().is_empty(), "QEMU runs: {:?}", m.qemu_pids());
    assert_eq!(still["restarts"], 1, "{still}");
    let reason = still["reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with(
            "failed 2 times; restart limit 1 reached: qemu exited unexpectedly (signal: 9"
        ),
        "{failed}\n{still}"
    );
    // Requests say why it does not serve.
    let r = m.run(&["exec", "solo", "--", "true"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("restart limit 1 reached"), "{}", r.stderr);

    // A person's restart brings it back and starts the count again.
    m.run(&["restart", "solo"]).ok();
    let again = solo(&m);
    assert_eq!(again["state"], "ready", "{again}");
    assert_eq!(again["restarts"], 0, "{again}");

    m.run(&["daemon", "stop"]).ok();
    assert!(m.qemu_pids().is_empty(), "QEMU left: {:?}", m.qemu_pids());
}

#[test]
fn restart_boots_the_instance_again_and_refuses_unknown_names() {
    let m = Mkctl::new("restart");

    // No daemon yet: nothing to restart, and the message says how to start.
    let r = m.run(&["restart", "solo"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("mkctl boot"), "{}", r.stderr);

    m.run(&["boot", &single()]).ok();
    let before = solo(&m);
    assert_eq!(before["state"], "ready");
    let (pid, id) = (before["pid"].as_u64().unwrap(), boot_id(&m));

    // An unknown name: exit 2, what exists is named, and nothing stopped.
    let r = m.run(&["restart", "solo", "nosuch"]);
    assert_eq!(r.code, 2, "{}\n{}", r.text(), r.stderr);
    assert!(
        r.stderr
            .contains("no instance \"nosuch\" in this daemon (it has: solo)"),
        "{}",
        r.stderr
    );
    let same = solo(&m);
    assert_eq!(same["state"], "ready");
    assert_eq!(same["pid"].as_u64(), Some(pid), "solo was touched: {same}");

    // A restart: stopped, booted again (another QEMU, another kernel boot),
    // ready when the command returns, and exec works in it.
    let r = m.run(&["restart", "solo"]).ok();
    assert!(
        r.text()
            .contains("restarted solo: stopped solo (powered off by its agent, "),
        "{}\n{}",
        r.text(),
        r.stderr
    );
    assert!(
        r.text().trim_end().ends_with("; solo ready"),
        "{}",
        r.text()
    );
    assert!(r.stderr.contains("[solo] stopped"), "{}", r.stderr);
    assert!(r.stderr.contains("[solo] ready in"), "{}", r.stderr);
    let after = solo(&m);
    assert_eq!(after["state"], "ready", "{after}");
    let new_pid = after["pid"].as_u64().unwrap();
    assert_ne!(new_pid, pid, "the same QEMU runs on");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the old QEMU {pid} is still there"
    );
    let new_id = boot_id(&m);
    assert_ne!(new_id, id, "the guest kernel did not boot again");
    let out = m
        .run(&["exec", "solo", "--", "sh", "-c", "echo back; exit 3"])
        .text();
    assert_eq!(out.trim(), "back");
    assert_eq!(m.run(&["exec", "solo", "--", "false"]).code, 1);

    // A failed instance (its QEMU killed) comes back too.
    std::process::Command::new("kill")
        .args(["-9", &new_pid.to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    while solo(&m)["state"] != "failed" {
        assert!(t.elapsed() < Duration::from_secs(5), "{}", solo(&m));
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = m.run(&["restart", "solo"]).ok();
    assert!(
        r.text().contains("solo had failed; solo ready"),
        "{}",
        r.text()
    );
    assert_eq!(solo(&m)["state"], "ready");
    assert_ne!(boot_id(&m), new_id);

    m.run(&["daemon", "stop"]).ok();
    assert!(m.qemu_pids().is_empty(), "QEMU left: {:?}", m.qemu_pids());
}
