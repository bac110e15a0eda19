//! Thread migration between real kernels under QEMU: `libmk/examples/
//! threads.c`, built against libmk as the README says and copied into a
//! guest with `mkctl exec`, moves its own threads to the other guest
//! (`mk_migrate`) and back, sharing a pthread mutex across the guests with
//! an exact total; a thread moved from outside with `mkctl migrate
//! PID/TID` keeps its loop going, on the other guest and on the host (another
//! kernel build, another CPU); killing the moved thread's shadow ends the
//! process on both kernels.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mkctl_e2e::{booted, c_example, Mkctl};

fn boot() -> Mkctl {
    let m = booted("threads", "migrate.toml");
    let prog = std::fs::read(c_example("threads")).expect("threads binary");
    for k in ["alpha", "beta"] {
        m.run_with_input(
            &[
                "exec",
                k,
                "--",
                "sh",
                "-c",
                "cat > /tmp/threads && chmod +x /tmp/threads",
            ],
            &prog,
        )
        .ok();
    }
    m
}

fn field<'a>(line: &'a str, k: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(k))
        .unwrap_or_else(|| panic!("no {k} in {line:?}"))
}

/// Lines of a command that runs on, read as they come.
struct Lines {
    rx: mpsc::Receiver<String>,
    child: std::process::Child,
}

impl Lines {
    fn next<T>(&self, t: Duration, f: impl Fn(&str) -> Option<T>) -> T {
        let end = Instant::now() + t;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let l = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no expected line within {t:?}"));
            if let Some(v) = f(&l) {
                return v;
            }
        }
    }

    /// Waits until the worker is seen in process `pid`, then checks its
    /// count goes on over `n` lines.
    fn counting_in(&self, pid: &str, n: usize) {
        let seen = |l: &str| -> Option<(u64, String)> {
            let l = l.strip_prefix("seen ")?;
            Some((
                field(l, "count=").parse().ok()?,
                field(l, "worker_pid=").to_string(),
            ))
        };
        let (mut last, _) = self.next(Duration::from_secs(60), |l| {
            seen(l).filter(|(_, p)| p == pid)
        });
        for _ in 0..n {
            let (c, p) = self.next(Duration::from_secs(60), seen);
            assert_eq!(p, pid, "the worker moved on its own");
            assert!(c > last, "the count stalled at {last} in {pid}");
            last = c;
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn watch(m: &Mkctl, stop: &str) -> (Lines, String, String) {
    let mut child = m
        .command()
        .args(["exec", "alpha", "--", "/tmp/threads", "watch", stop])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mkctl exec");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let lines = Lines { rx, child };
    let tid: String = lines.next(Duration::from_secs(60), |l| {
        l.strip_prefix("worker_tid=").map(str::to_string)
    });
    let pid: String = lines.next(Duration::from_secs(60), |l| {
        l.strip_prefix("seen ")
            .map(|l| field(l, "pid=").to_string())
    });
    (lines, pid, tid)
}

#[test]
fn threads_move_between_guests_by_themselves_and_from_outside() {
    let m = boot();

    // mk_migrate: half the workers sum their slices on beta (id 2).
    let out = m
        .run(&["exec", "alpha", "--", "/tmp/threads", "sum", "2", "4", "8"])
        .ok()
        .text();
    let line = out.lines().find(|l| l.starts_with("total=")).expect(&out);
    assert_eq!(field(line, "total="), field(line, "expected="), "{line}");
    assert_eq!(field(line, "moved="), "2", "{line}");
    assert_eq!(field(line, "home="), "1", "{line}");

    // There and back, checking where it runs on each side.
    let out = m
        .run(&["exec", "alpha", "--", "/tmp/threads", "bounce", "2", "3"])
        .ok()
        .text();
    assert!(out.contains("rounds=3 home=3 away=3"), "{out}");

    // One pthread mutex, threads moving between the guests every 300
    // increments: waits on it cross kernels, and the total is exact.
    let out = m
        .run(&[
            "exec",
            "alpha",
            "--",
            "/tmp/threads",
            "mutex",
            "2",
            "4",
            "300",
            "3",
        ])
        .ok()
        .text();
    assert!(out.contains("count=3600 expected=3600"), "{out}");
    // The same from beta, every 50: a thread that asks to move on as soon
    // as it arrived asks before its shadow is recorded (it was taken for a
    // process of alpha's own, and its move failed with EIO).
    let out = m
        .run(&[
            "exec",
            "beta",
            "--",
            "/tmp/threads",
            "mutex",
            "1",
            "4",
            "50",
            "8",
        ])
        .ok()
        .text();
    assert!(out.contains("count=1600 expected=1600"), "{out}");
    // Those processes ended: the DSM regions their memory became went
    // with them, on both guests (each run left ~16 before).
    let t = Instant::now();
    loop {
        let ls = m.run(&["dsm", "ls", "--json"]).ok().text();
        if !ls.contains("\"p1.") && !ls.contains("\"p2.") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "left: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // From outside: mkctl migrate PID/TID.
    let (lines, pid, tid) = watch(&m, "/tmp/stop-watch");
    lines.counting_in(&pid, 2);
    let target = format!("{pid}/{tid}");
    // `mkctl migrate PID/TID --to <to> --json`: it runs there, in the
    // shadow whose pid this gives.
    let move_to = |to: &str| {
        let moved = m
            .run(&["migrate", &target, "--from", "alpha", "--to", to, "--json"])
            .ok()
            .json();
        assert_eq!(moved["at"], to, "{moved}");
        moved["shadow_pid"]
            .as_u64()
            .expect("shadow pid")
            .to_string()
    };
    let shadow = move_to("beta");
    lines.counting_in(&shadow, 3);
    // Split, it has its regions, as the ended processes had: `dsm ls`
    // shows them by the name the check above looks for.
    let ls = m.run(&["dsm", "ls", "--json"]).ok().text();
    assert!(ls.contains(&format!("\"p1.{pid}.")), "{ls}");
    let away = m.run(&["threads", "--json"]).ok().json();
    assert_eq!(
        away,
        serde_json::json!([{"kernel": "alpha", "pid": pid.parse::<u32>().unwrap(),
            "tid": tid.parse::<u32>().unwrap(), "at": "beta",
            "shadow_pid": shadow.parse::<u32>().unwrap()}]),
        "{away}"
    );
    // On to the host, which runs another kernel build (the shadow's vDSO
    // redirected to the host's) on another CPU (its registers laid out
    // for it, and back): the loop goes on there, and back home.
    let host_shadow = move_to("host");
    let comm = std::fs::read_to_string(format!("/proc/{host_shadow}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "threads", "the host's shadow {host_shadow}");
    lines.counting_in(&host_shadow, 3);
    let back = m
        .run(&["migrate", &target, "--from", "alpha", "--to", "alpha"])
        .ok()
        .text();
    assert!(back.contains("back on alpha"), "{back}");
    assert_eq!(
        m.run(&["threads", "--json"]).ok().json(),
        serde_json::json!([])
    );
    lines.counting_in(&pid, 2);
    m.run(&["exec", "alpha", "--", "sh", "-c", ": > /tmp/stop-watch"])
        .ok();
    let joined: u64 = lines.next(Duration::from_secs(60), |l| {
        l.strip_prefix("joined count=")?.parse().ok()
    });
    assert!(joined > 0);
}

#[test]
fn killing_a_moved_thread_ends_its_process_on_both_guests() {
    let m = boot();
    let (lines, pid, tid) = watch(&m, "/tmp/stop-kill");
    let moved = m
        .run(&[
            "migrate",
            &format!("{pid}/{tid}"),
            "--from",
            "alpha",
            "--to",
            "beta",
            "--json",
        ])
        .ok()
        .json();
    let shadow = moved["shadow_pid"]
        .as_u64()
        .expect("shadow pid")
        .to_string();
    lines.counting_in(&shadow, 1);
    m.run(&["exec", "beta", "--", "kill", "-9", &shadow]).ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = m.run(&[
            "exec",
            "alpha",
            "--",
            "sh",
            "-c",
            &format!("test -d /proc/{pid}"),
        ]);
        let b = m.run(&[
            "exec",
            "beta",
            "--",
            "sh",
            "-c",
            &format!("test -d /proc/{shadow}"),
        ]);
        if a.code != 0 && b.code != 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: process {pid} on alpha ({}), shadow {shadow} on beta ({})",
            a.code,
            b.code
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
