//! The soak figure (issue 19): boot, traffic, stop, again and again, under
//! one daemon; then the daemon stops. After every stop no QEMU of the test
//! runs and no RAM file is left in the daemon's `/dev/shm` tree; from the
//! second round on the daemon holds as many descriptors and threads after a
//! stop as after the first (nothing leaks per round); at the end the daemon,
//! its `/dev/shm` tree and its socket are gone.
//!
//! `MKCTL_SOAK_ROUNDS=N` sets the rounds (default 3, for CI's budget; the
//! README gives a run of 20). Boots a real kernel under QEMU: needs
//! `scripts/setup.sh` (fails, never skips, without it).

use std::path::PathBuf;
use std::time::Instant;

use mkctl_e2e::{repo_root, Mkctl};

/// `/dev/shm/mkctl-*` directories, by name.
fn shm_trees() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/dev/shm")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("mkctl-"))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// How many entries `dir` holds (0 when it is gone).
fn count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[test]
fn boot_traffic_stop_rounds_leave_nothing_behind() {
    let rounds: usize = std::env::var("MKCTL_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let cfg = repo_root()
        .join("tests/configs/single.toml")
        .display()
        .to_string();
    let before = shm_trees();
    let m = Mkctl::new("soak");
    let mut first: Option<(usize, usize)> = None;
    let mut daemon_pid = 0u32;
    let started = Instant::now();
    for round in 0..rounds {
        m.run(&["boot", &cfg]).ok();
        let echo = m
            .run(&["exec", "solo", "--", "echo", &format!("round{round}")])
            .ok()
            .text();
        assert_eq!(echo.trim(), format!("round{round}"));
        let t = m
            .run(&["traffic", "host", "solo", "--count", "2000", "--json"])
            .ok()
            .json();
        assert_eq!(
            (t["sent"].as_u64(), t["good"].as_u64(), t["bad"].as_u64()),
            (Some(2000), Some(2000), Some(0)),
            "round {round}: {t}"
        );
        m.run(&["stop", "solo"]).ok();
        assert!(
            m.qemu_pids().is_empty(),
            "round {round}: QEMU left: {:?}",
            m.qemu_pids()
        );
        let st = m.run(&["status", "--json"]).ok().json();
        daemon_pid = st["daemon"]["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no daemon pid in {st}")) as u32;
        let ours: Vec<PathBuf> = shm_trees()
            .into_iter()
            .filter(|t| !before.contains(t))
            .collect();
        assert!(
            ours.iter().all(|t| count(t) == 0),
            "round {round}: RAM files left in {ours:?}"
        );
        let fds = count(&PathBuf::from(format!("/proc/{daemon_pid}/fd")));
        let threads = count(&PathBuf::from(format!("/proc/{daemon_pid}/task")));
        eprintln!("round {round}: daemon {daemon_pid} holds {fds} fds, {threads} threads");
        match first {
            // Round 0 may set up what the daemon keeps for good.
            None if round == 0 => {}
            None => first = Some((fds, threads)),
            Some(f) => assert_eq!(
                (fds, threads),
                f,
                "round {round}: the daemon's descriptors and threads grew"
            ),
        }
    }
    eprintln!(
        "{rounds} rounds of boot, exec, 2000 messages host -> solo, stop in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    m.run(&["daemon", "stop"]).ok();
    // Gone, or a zombie its parent (init) has yet to reap: not running.
    let stat = std::fs::read_to_string(format!("/proc/{daemon_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "the daemon {daemon_pid} outlived its stop: {stat}"
    );
    assert_eq!(shm_trees(), before, "a /dev/shm tree outlived the daemon");
    assert!(m.qemu_pids().is_empty());
}
