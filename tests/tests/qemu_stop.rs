//! `mkctl stop` escalates — the agent's power-off, QMP quit after
//! `--timeout` (at once with `--force`), a kill 3 s later — and says which
//! step ended each instance, in text and in `--json`. Each step is made to
//! happen for real: a guest that powers off, `--force`, and a QEMU frozen
//! with SIGSTOP that neither its agent nor QMP can stop.
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

fn solo_pid(m: &Mkctl) -> u32 {
    let st = m.run(&["status", "--json"]).ok().json();
    let solo = st["daemon"]["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "solo"))
        .unwrap_or_else(|| panic!("no solo in {st}"));
    assert_eq!(solo["state"], "ready", "{solo}");
    u32::try_from(solo["pid"].as_u64().expect("solo's pid")).unwrap()
}

/// `mkctl stop solo ARGS --json`: the one instance's outcome, after checking
/// the whole answer's shape.
fn stop_json(m: &Mkctl, args: &[&str]) -> (serde_json::Value, String) {
    let mut all = vec!["stop", "solo", "--json"];
    all.extend_from_slice(args);
    let r = m.run(&all).ok();
    let v = r.json();
    let list = v["instances"].as_array().expect("instances");
    assert_eq!(list.len(), 1, "{v:#}");
    let solo = list[0].clone();
    assert_eq!(solo["name"], "solo", "{v:#}");
    assert_eq!(solo["before"], "ready", "{v:#}");
    (solo, format!("{}\n{}", v["message"], r.stderr))
}

#[test]
fn stop_says_which_step_ended_the_instance() {
    let m = Mkctl::new("stop-steps");
    let boot = || {
        m.run(&["boot", &single()]).ok();
        solo_pid(&m)
    };

    // 1. A guest that answers powers off through its agent.
    boot();
    let r = m.run(&["stop", "solo"]).ok();
    assert!(
        r.text()
            .contains("stopped solo (powered off by its agent, "),
        "{}\n{}",
        r.text(),
        r.stderr
    );
    assert!(
        r.stderr.contains("asked the agent to power off"),
        "{}",
        r.stderr
    );
    boot();
    let (solo, said) = stop_json(&m, &[]);
    assert_eq!(solo["step"], "agent", "{said}");
    let ms = solo["elapsed_ms"].as_u64().expect("elapsed_ms");
    assert!(ms < 15_000, "the agent took the whole timeout: {ms} ms");

    // 2. --force skips the agent: QMP quit at once.
    boot();
    let t0 = Instant::now();
    let (solo, said) = stop_json(&m, &["--force"]);
    assert_eq!(solo["step"], "qmp-quit", "{said}");
    assert!(said.contains("--force: QMP quit"), "{said}");
    assert!(!said.contains("asked the agent"), "{said}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    // 3. A frozen QEMU: no power-off within the timeout, QMP cannot
    //    answer, so it is killed 3 s after the QMP quit.
    let pid = boot();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP the QEMU");
    let t0 = Instant::now();
    let (solo, said) = stop_json(&m, &["--timeout", "1"]);
    assert_eq!(solo["step"], "kill", "{said}");
    assert!(said.contains("no power-off after 1 s: QMP quit"), "{said}");
    assert!(said.contains("killed"), "{said}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "timeout 1 s + 3 s to the kill, took {took:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} is still there"
    );

    // Stopping it again says it was not running; the text says the same.
    let r = m.run(&["stop", "solo"]).ok();
    assert_eq!(r.text().trim(), "solo was not running");

    m.run(&["daemon", "stop"]).ok();
    assert!(m.qemu_pids().is_empty(), "QEMU left: {:?}", m.qemu_pids());
}
