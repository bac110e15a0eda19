//! A daemon that can restart (issue 19, item 3): the daemon is killed with
//! SIGKILL while two guests run; their QEMUs run on, the next command starts
//! a new daemon that adopts them (same QEMU pids, `adopted` in the status),
//! and `exec`, `migrate` (with its output stream checked for gaps) and
//! `stop` work through it; a process started before the kill still runs.
//! `mkctl daemon restart` hands over to a new daemon the same way. A QEMU
//! that dies while no daemon runs is shown failed, saying so, and boots
//! again. After `daemon stop` nothing is left.
//!
//! Boots real kernels under QEMU: needs `scripts/setup.sh` (fails, never
//! skips, without it).

use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mkctl_e2e::{booted, collect_lines, test_config, Mkctl};

fn status(m: &Mkctl) -> serde_json::Value {
    m.run(&["status", "--json"]).ok().json()["daemon"].clone()
}

fn instance(st: &serde_json::Value, name: &str) -> serde_json::Value {
    st["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {st}"))
        .clone()
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.contains(") Z ") && !s.contains(") X "))
}

fn kill9(pid: u64) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -9 {pid}");
}

/// Waits until `pid` has exited (gone or a zombie), at most 10 s.
fn until_dead(pid: u64) {
    let t = Instant::now();
    while alive(pid) {
        assert!(t.elapsed() < Duration::from_secs(10), "{pid} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `seq=` number `mkcounter` wrote to `/tmp/c.log` on alpha.
fn last_seq_in_log(m: &Mkctl) -> u64 {
    let t = m
        .run(&["exec", "alpha", "--", "tail", "-n", "1", "/tmp/c.log"])
        .ok()
        .text();
    t.strip_prefix("seq=")
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no seq in {t:?}"))
}

/// `mkctl exec alpha -- mkcounter`, its output lines collected.
fn counter(m: &Mkctl) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = m
        .command()
        .args([
            "exec",
            "alpha",
            "--",
            "/bin/mkcounter",
            "--mem",
            "8M",
            "--interval-ms",
            "20",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = collect_lines(child.stdout.take().unwrap());
    (child, lines)
}

fn seqs(lines: &Mutex<Vec<String>>) -> Vec<u64> {
    mkctl_e2e::seq_numbers(&lines.lock().unwrap())
}

fn until_seqs(lines: &Mutex<Vec<String>>, n: usize) {
    let t = Instant::now();
    while seqs(lines).len() < n {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "only {} lines",
            seqs(lines).len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_daemon_is_replaced_by_one_that_adopts_its_instances() {
    let m = booted("adopt", "migrate.toml");
    let st = status(&m);
    let old_daemon = st["pid"].as_u64().unwrap();
    let qemu = |st: &serde_json::Value, n: &str| instance(st, n)["pid"].as_u64().unwrap();
    let (alpha, beta) = (qemu(&st, "alpha"), qemu(&st, "beta"));
    assert_eq!(instance(&st, "alpha")["adopted"], false);
    // A process that does not depend on any client: it writes to a file.
    m.run(&[
        "exec",
        "alpha",
        "--",
        "sh",
        "-c",
        "/bin/mkcounter --interval-ms 50 > /tmp/c.log 2>&1 </dev/null &",
    ])
    .ok();
    std::thread::sleep(Duration::from_secs(1));
    let background = m
        .run(&["exec", "alpha", "--", "pidof", "mkcounter"])
        .ok()
        .text();

    // The daemon dies as a crash would kill it: the QEMUs run on.
    kill9(old_daemon);
    until_dead(old_daemon);
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(alpha) && alive(beta), "a QEMU died with its daemon");

    // The next command starts a daemon, which adopts both.
    let st = status(&m);
    let daemon = st["pid"].as_u64().unwrap();
    assert_ne!(daemon, old_daemon);
    for (n, pid) in [("alpha", alpha), ("beta", beta)] {
        let i = instance(&st, n);
        assert_eq!(i["state"], "ready", "{i}");
        assert_eq!(i["pid"], pid, "{i}");
        assert_eq!(i["adopted"], true, "{i}");
        assert!(i["uptime_ms"].as_u64().unwrap() > 1000, "{i}");
    }
    // The process started before the kill still runs, and writes on.
    let after = m
        .run(&["exec", "alpha", "--", "pidof", "mkcounter"])
        .ok()
        .text();
    assert_eq!(after, background);
    let s1 = last_seq_in_log(&m);
    std::thread::sleep(Duration::from_millis(500));
    assert!(last_seq_in_log(&m) > s1, "the background process stopped");

    // A move through the new daemon: its output goes on with no gap.
    let (mut exec, lines) = counter(&m);
    until_seqs(&lines, 5);
    let pids = m
        .run(&["exec", "alpha", "--", "pidof", "mkcounter"])
        .ok()
        .text();
    let pid = pids
        .split_whitespace()
        .find(|p| !background.split_whitespace().any(|b| b == *p))
        .unwrap_or_else(|| panic!("no new mkcounter in {pids:?}"))
        .to_string();
    let moved = m
        .run(&["migrate", &pid, "--from", "alpha", "--to", "beta", "--json"])
        .ok()
        .json();
    let new_pid = moved["new_pid"].as_u64().unwrap();
    let seen = seqs(&lines).len();
    until_seqs(&lines, seen + 10);
    let s = seqs(&lines);
    for w in s.windows(2) {
        assert_eq!(w[1], w[0] + 1, "gap or repeat in {s:?}");
    }

    // A handover: the new daemon adopts the same QEMUs, and the moved
    // process runs on beta under it.
    let r = m.run(&["daemon", "restart", "--json"]).ok().json();
    let st = r["daemon"].clone();
    assert_ne!(st["pid"].as_u64().unwrap(), daemon);
    assert_eq!(qemu(&st, "alpha"), alpha);
    assert_eq!(qemu(&st, "beta"), beta);
    assert!(!alive(daemon), "the old daemon still runs");
    let on_beta = m
        .run(&["exec", "beta", "--", "pidof", "mkcounter"])
        .ok()
        .text();
    assert_eq!(on_beta.trim(), new_pid.to_string());
    let _ = exec.kill();
    let _ = exec.wait();

    // A QEMU that dies while no daemon runs: failed, saying why; a boot
    // brings it back, and the other one was adopted all along.
    kill9(st["pid"].as_u64().unwrap());
    kill9(beta);
    until_dead(beta);
    let st = status(&m);
    let b = instance(&st, "beta");
    assert_eq!(b["state"], "failed", "{b}");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("its QEMU (pid {beta}) exited while no daemon ran")),
        "{b}"
    );
    assert_eq!(instance(&st, "alpha")["state"], "ready");
    m.run(&["boot", &test_config("migrate.toml")]).ok();
    m.run(&["exec", "beta", "--", "true"]).ok();

    // Stop through the adopted daemon: nothing left.
    let out = m.run(&["stop", "--all", "--json"]).ok();
    assert!(out.text().contains("alpha"), "{}", out.text());
    assert!(!alive(alpha), "alpha's QEMU outlived its stop");
    assert!(m.qemu_pids().is_empty(), "{:?}", m.qemu_pids());
    m.run(&["daemon", "stop"]).ok();
    assert!(
        !m.run_dir().join("state.json").exists(),
        "a daemon that stopped its instances leaves nothing to adopt"
    );
}
