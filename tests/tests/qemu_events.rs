//! `mkctl events --json`: a subscriber started before anything boots sees,
//! in order and numbered without a hole, both instances boot, `mkcounter`
//! move from alpha to beta (start, running with its new pid, end with the
//! figures `mkctl migrate` printed), beta fail when its QEMU is killed and
//! come back by its restart policy (with the count), and the daemon stop; then it ends with exit 0. A subscriber that comes
//! late with `--last` gets the same events from the daemon's ring.
//!
//! Boots real kernels under QEMU: needs `scripts/setup.sh` (fails, never
//! skips, without it).

use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mkctl_e2e::{cache_dir, collect_lines, Mkctl};
use serde_json::Value;

/// Two instances (the migration test's machine), with mkcounter in their
/// initramfs.
fn topology(m: &Mkctl) -> String {
    let text = format!(
        r#"
[[machine.node]]
id = 0
cpus = "0-1"
memory = "2G"

[[machine.node]]
id = 1
cpus = "2-3"
memory = "2G"

[host]
cpus = "0"

[pool]
base = "0x40000000"
size = "3G"

[window]
size = "16M"

[defaults]
backend = "qemu"
kernel = "auto"
initrd = "auto"
files = {{ "/bin/mkcounter" = "{}" }}

[[instance]]
name = "alpha"
id = 1
cpus = "1"
memory = "256M"

[[instance]]
name = "beta"
id = 2
cpus = "2-3"
memory = "256M"
restart = "on-failure"
"#,
        cache_dir().join("mkcounter").display()
    );
    let path = m.scratch.join("events.toml");
    std::fs::write(&path, text).expect("write the topology");
    path.display().to_string()
}

/// A child whose stdout lines are collected as they come.
struct Lines {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    fn spawn(m: &Mkctl, args: &[&str]) -> Lines {
        let mut child = m
            .command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mkctl");
        let lines = collect_lines(child.stdout.take().unwrap());
        Lines { child, lines }
    }

    fn events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits until an event matches `want`; returns it.
    fn wait_for(&self, what: &str, secs: u64, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(e) = self.events().into_iter().find(&want) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} event after {secs} s; got:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for it to exit (at most `secs`); its exit code.
    fn wait(&mut self, secs: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("still running after {secs} s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn state(e: &Value, instance: &str, from: Option<&str>, to: &str) -> bool {
    e["event"] == "state"
        && e["instance"] == instance
        && e["to"] == to
        && from.map_or(e["from"].is_null(), |f| e["from"] == f)
}

/// The position of the first event matching `want` (failing with every
/// event when none does).
fn pos(events: &[Value], what: &str, want: impl Fn(&Value) -> bool) -> usize {
    events
        .iter()
        .position(want)
        .unwrap_or_else(|| panic!("no {what} in {events:#?}"))
}

fn instance_pid(m: &Mkctl, name: &str) -> u64 {
    let i = mkctl_e2e::instance_status(m, name);
    i["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no QEMU pid for {name} in {i}"))
}

#[test]
fn events_follow_boot_migration_failure_and_stop_in_order() {
    let m = Mkctl::new("events");
    let config = topology(&m);
    // No daemon yet: a clear failure, not a wait.
    let none = m.run(&["events"]);
    assert_eq!(none.code, 1, "{none:?}");
    assert!(none.stderr.contains("no mkctl daemon runs"), "{none:?}");

    // A daemon with nothing booted, and the subscriber before the boot.
    std::fs::create_dir_all(m.run_dir()).unwrap();
    let log = std::fs::File::create(m.scratch.join("daemon.out")).unwrap();
    let mut daemon = m
        .command()
        .args(["daemon", "run"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn the daemon");
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(m.run_dir().join("mkctl.sock")).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "no daemon socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut early = Lines::spawn(&m, &["events", "--json"]);

    m.run(&["boot", &config]).ok();
    for name in ["alpha", "beta"] {
        early.wait_for(&format!("{name} ready"), 10, |e| {
            state(e, name, Some("booting"), "ready")
        });
    }

    // mkcounter moves alpha -> beta.
    let mut counter = Lines::spawn(
        &m,
        &[
            "exec",
            "alpha",
            "--",
            "/bin/mkcounter",
            "--mem",
            "4M",
            "--interval-ms",
            "20",
        ],
    );
    let t = Instant::now();
    while counter.lines.lock().unwrap().len() < 3 {
        assert!(t.elapsed() < Duration::from_secs(30), "mkcounter is silent");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid: u32 = m
        .run(&["exec", "alpha", "--", "pidof", "mkcounter"])
        .ok()
        .text()
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("mkcounter's pid on alpha");
    let moved = m
        .run(&[
            "migrate",
            &pid.to_string(),
            "--from",
            "alpha",
            "--to",
            "beta",
            "--json",
        ])
        .ok()
        .json();
    let end = early.wait_for("migrate-end", 10, |e| e["event"] == "migrate-end");
    assert_eq!(end["pid"], pid);
    assert_eq!(end["from"], "alpha");
    assert_eq!(end["to"], "beta");
    assert_eq!(end["new_pid"], moved["new_pid"], "{moved}");
    assert_eq!(end["downtime_ns"], moved["downtime_ns"], "{moved}");
    assert!(end["downtime_ns"].as_u64().unwrap() > 0, "{end}");
    assert!(end["image_bytes"].as_u64().unwrap() > 0, "{end}");
    assert!(end["pages"].as_u64().unwrap() > 0, "{end}");
    // It ends on beta, with the mkctl exec that follows it.
    m.run(&[
        "exec",
        "beta",
        "--",
        "kill",
        &moved["new_pid"].as_u64().unwrap().to_string(),
    ])
    .ok();
    counter.wait(30);

    // beta's QEMU dies: failed, with the reason; its policy boots it again.
    let qemu = instance_pid(&m, "beta");
    assert!(std::process::Command::new("kill")
        .args(["-9", &qemu.to_string()])
        .status()
        .unwrap()
        .success());
    let failed = early.wait_for("beta failed", 10, |e| {
        state(e, "beta", Some("ready"), "failed")
    });
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("qemu exited unexpectedly")),
        "{failed}"
    );
    assert_eq!(failed["restarts"], 0, "{failed}");
    early.wait_for("beta ready again", 60, |e| {
        state(e, "beta", Some("booting"), "ready") && e["restarts"] == 1
    });

    // A late subscriber asks for what the ring kept.
    let mut late = Lines::spawn(&m, &["events", "--json", "--last", "1000"]);
    late.wait_for("the ring's beta ready again", 10, |e| {
        state(e, "beta", Some("booting"), "ready") && e["restarts"] == 1
    });

    // And one for people.
    let mut human = Lines::spawn(&m, &["events", "--last", "1000"]);
    let t = Instant::now();
    while !human
        .lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("beta booting -> ready (restarts: 1)"))
    {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", human.lines);
        std::thread::sleep(Duration::from_millis(50));
    }

    // The daemon stops: the streams end, with exit 0.
    // (`daemon stop` waits for the daemon's pid to go: reap it meanwhile.)
    let reaper = std::thread::spawn(move || daemon.wait());
    m.run(&["daemon", "stop"]).ok();
    assert!(reaper.join().unwrap().unwrap().success());
    assert_eq!(early.wait(10), 0, "the stream ends cleanly");
    assert_eq!(late.wait(10), 0);
    assert_eq!(human.wait(10), 0);

    let ev = early.events();
    // Numbered 1, 2, 3... with nothing missed, in time order.
    for (i, e) in ev.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "{ev:#?}");
        assert_ne!(e["event"], "gap", "{ev:#?}");
    }
    assert!(ev
        .windows(2)
        .all(|w| w[0]["time_ms"].as_u64() <= w[1]["time_ms"].as_u64()));
    // Each instance: new -> booting -> ready; the migration's steps in
    // order after both are ready; beta fails; the daemon stops alpha.
    let order = [
        pos(&ev, "alpha booting", |e| state(e, "alpha", None, "booting")),
        pos(&ev, "alpha ready", |e| {
            state(e, "alpha", Some("booting"), "ready")
        }),
        pos(&ev, "migrate-start", |e| {
            e["event"] == "migrate-start"
                && e["pid"] == pid
                && e["from"] == "alpha"
                && e["to"] == "beta"
                && e["mode"] == "lazy"
        }),
        pos(&ev, "migrate-running", |e| {
            e["event"] == "migrate-running" && e["new_pid"] == moved["new_pid"]
        }),
        pos(&ev, "migrate-end", |e| e["event"] == "migrate-end"),
        pos(&ev, "beta failed", |e| {
            state(e, "beta", Some("ready"), "failed")
        }),
        pos(&ev, "beta booting again", |e| {
            state(e, "beta", Some("failed"), "booting") && e["restarts"] == 1
        }),
        pos(&ev, "beta ready again", |e| {
            state(e, "beta", Some("booting"), "ready") && e["restarts"] == 1
        }),
        pos(&ev, "daemon-stopping", |e| e["event"] == "daemon-stopping"),
        pos(&ev, "alpha stopping", |e| {
            state(e, "alpha", Some("ready"), "stopping")
        }),
        pos(&ev, "alpha stopped", |e| {
            state(e, "alpha", Some("stopping"), "stopped")
        }),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "{order:?} in {ev:#?}"
    );
    let beta_ready = pos(&ev, "beta ready", |e| {
        state(e, "beta", Some("booting"), "ready")
    });
    assert!(pos(&ev, "beta booting", |e| state(e, "beta", None, "booting")) < beta_ready);
    assert!(beta_ready < order[2]);
    assert!(
        !ev.iter()
            .any(|e| e["event"] == "migrate-failed"
                || (e["instance"] == "alpha" && e["to"] == "failed")),
        "{ev:#?}"
    );
    assert_eq!(ev.iter().filter(|e| e["event"] == "migrate-end").count(), 1);
    // The count is there with a policy only.
    for e in ev.iter().filter(|e| e["event"] == "state") {
        if e["instance"] == "alpha" {
            assert!(e["restarts"].is_null(), "{e}");
        } else {
            assert!(e["restarts"].is_u64(), "{e}");
        }
    }
    let first_ready = pos(&ev, "beta ready", |e| {
        state(e, "beta", Some("booting"), "ready")
    });
    assert_eq!(ev[first_ready]["restarts"], 0);

    // The late one got the same events, from the ring, then the rest.
    assert_eq!(late.events(), ev);
    // People get a line each: `HH:MM:SS.mmm what happened`.
    let text = human.lines.lock().unwrap().clone();
    eprintln!("{}", text.join("\n"));
    assert_eq!(text.len(), ev.len(), "{text:#?}");
    let clock = |l: &str| {
        l.len() > 13
            && l.as_bytes()[2] == b':'
            && l.as_bytes()[5] == b':'
            && l.as_bytes()[8] == b'.'
    };
    assert!(text.iter().all(|l| clock(l)), "{text:#?}");
    for want in [
        " alpha (new) -> booting".to_string(),
        " alpha booting -> ready".to_string(),
        format!(" migrate pid {pid} alpha -> beta (lazy): started"),
        format!(
            " migrate pid {pid} alpha -> beta: done, pid {}, downtime ",
            moved["new_pid"]
        ),
        " beta ready -> failed: qemu exited unexpectedly".to_string(),
        " beta failed -> booting (restarts: 1)".to_string(),
        " daemon stopping".to_string(),
        " alpha stopping -> stopped".to_string(),
    ] {
        assert!(
            text.iter().any(|l| l.contains(&want)),
            "no {want:?} in {text:#?}"
        );
    }
}
