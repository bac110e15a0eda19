//! `mkctl restart NAME`: the instance is stopped and booted again by the
//! daemon — a new QEMU, a new kernel boot — and is ready and serves `exec`
//! when the command returns; a failed instance comes back the same way; an
//! unknown name stops nothing and fails with a message naming what exists.
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
    let st = m.run(&["status", "--json"]).ok().json();
    st["daemon"]["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "solo"))
        .unwrap_or_else(|| panic!("no solo in {st}"))
        .clone()
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
