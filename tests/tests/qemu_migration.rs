//! Process migration between two kernels under QEMU: a multithreaded,
//! statically linked `mkcounter` started with `mkctl exec` on alpha moves
//! to beta, back, and to beta again; the exec stream on the host keeps
//! printing with no gap and no repeat, the memory checksum (printed on
//! SIGUSR1) stays the same, the origin no longer runs it, and its end
//! comes back as the exec's exit status. Then a destination that dies in
//! the middle of a transfer leaves the original running on the origin. And
//! a checkpoint on alpha restored on beta goes on from the next line with
//! the same memory, and dies with the `mkctl restore` that runs it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use mkctl_e2e::{booted, exec_watched, migrate_json, no_gap, pid_on, watch, Mkctl, Watched};

fn start(m: &Mkctl, on: &str, mem: &str) -> Watched {
    exec_watched(
        m,
        on,
        &["/bin/mkcounter", "--mem", mem, "--interval-ms", "20"],
    )
}

/// `mkctl migrate PID --from alpha --to beta`, which must fail (exit 1).
fn refused_move(m: &Mkctl, pid: u32) -> mkctl_e2e::CmdOut {
    mkctl_e2e::refused_move(m, pid, "alpha", "beta")
}

/// After a move that failed: the same process `pid` runs on alpha and
/// prints 10 more lines.
fn runs_on(m: &Mkctl, w: &Watched, pid: u32) {
    assert_eq!(pid_on(m, "alpha"), pid);
    let seen = w.count("seq=");
    w.wait_for(
        "output after the failed move",
        Duration::from_secs(30),
        |l| l.iter().filter(|x| x.starts_with("seq=")).count() >= seen + 10,
    );
}

/// Runs `script` on `on` until it prints nothing, failing with `why(output)`
/// after `t`.
fn until_empty(m: &Mkctl, on: &str, script: &str, t: Duration, why: impl Fn(&str) -> String) {
    let deadline = Instant::now() + t;
    let script = format!("{script} || true");
    loop {
        let left = m.run(&["exec", on, "--", "sh", "-c", &script]).ok().text();
        if left.trim().is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{}", why(&left));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn usr1(m: &Mkctl, on: &str, pid: u32) {
    m.run(&["exec", on, "--", "kill", "-USR1", &pid.to_string()])
        .ok();
}

fn boot() -> Mkctl {
    booted("migrate", "migrate.toml")
}

#[test]
fn mkcounter_moves_alpha_beta_alpha_beta_without_a_gap() {
    let m = boot();
    let mut w = start(&m, "alpha", "16M");
    let mut pid = pid_on(&m, "alpha");
    usr1(&m, "alpha", pid);
    w.wait_for("checksum", Duration::from_secs(20), |l| {
        l.iter().any(|x| x.starts_with("checksum="))
    });
    let before = w.checksums()[0].clone();
    let mut at = "alpha";
    for hop in 0..3 {
        let to = if at == "alpha" { "beta" } else { "alpha" };
        // Lazy (post-copy), stop-copy, lazy.
        let mode = if hop == 1 { "stop-copy" } else { "lazy" };
        // Hop 1 names the kernels by id; messages still use their names.
        let id = |n: &str| if n == "alpha" { "1" } else { "2" };
        let (from_arg, to_arg) = if hop == 1 { (id(at), id(to)) } else { (at, to) };
        let out = m
            .run(&[
                "migrate",
                &pid.to_string(),
                "--from",
                from_arg,
                "--to",
                to_arg,
                "--mode",
                mode,
                "--json",
            ])
            .ok();
        let r = out.json();
        eprintln!("hop {hop}: {r}");
        let new_pid = r["new_pid"].as_u64().unwrap() as u32;
        // Progress while it runs: the copy's pid as soon as it runs.
        assert!(
            out.stderr
                .contains(&format!("[{to}] running as pid {new_pid} after")),
            "{}",
            out.stderr
        );
        // The origin no longer has it: killed once the move was over, and
        // reaped there (not left a zombie while its output goes on).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = m
                .run(&[
                    "exec",
                    at,
                    "--",
                    "sh",
                    "-c",
                    &format!("cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null || echo gone"),
                ])
                .ok()
                .text();
            if state.trim() == "gone" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{at} still holds {pid}: state {state:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(pid_on(&m, to), new_pid);
        pid = new_pid;
        at = to;
        let seen = w.count("seq=");
        w.wait_for("output after the move", Duration::from_secs(30), |l| {
            l.iter().filter(|x| x.starts_with("seq=")).count() >= seen + 10
        });
        let k = w.checksums().len();
        usr1(&m, at, pid);
        w.wait_for("checksum after the move", Duration::from_secs(20), |l| {
            l.iter().filter(|x| x.starts_with("checksum=")).count() > k
        });
        assert_eq!(w.checksums()[k], before, "memory changed at hop {hop}");
    }
    no_gap(&w.seqs());
    // CLOCK_MONOTONIC went on across the moves between two guests that
    // booted at different moments: never backwards, never a jump (a line
    // every 20 ms; a lazy move's downtime is well under a second).
    let monos: Vec<u64> = w
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("mono_ms="))
        })
        .filter_map(|v| v.parse().ok())
        .collect();
    for p in monos.windows(2) {
        assert!(
            p[1] >= p[0] && p[1] - p[0] < 3000,
            "CLOCK_MONOTONIC went from {} to {} ms",
            p[0],
            p[1]
        );
    }
    // To the host: another kernel build (the vDSO proxy) and another CPU,
    // whose register state is laid out otherwise (x87, SSE and AVX carried,
    // the guests' protection-key register dropped). The guests' CPU has no
    // user-visible extension the host lacks (mkctl switches those off), so
    // whatever the program picked its code for, the host has.
    use mknode::migrate::cpu;
    let guest = cpu::features_of(
        &m.run(&["exec", at, "--", "cat", "/proc/cpuinfo"])
            .ok()
            .text(),
    );
    let host = cpu::user_features();
    let lacking: Vec<&String> = guest.iter().filter(|f| !host.contains(f)).collect();
    assert!(
        lacking.is_empty(),
        "the host lacks {lacking:?} of the guest's extensions"
    );
    let host_pid = migrate_json(&m, pid, at, "host", "stop-copy")["new_pid"]
        .as_u64()
        .expect("new_pid") as i32;
    let comm = std::fs::read_to_string(format!("/proc/{host_pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "mkcounter", "pid {host_pid} on the host");
    let seen = w.count("seq=");
    w.wait_for("output from the host", Duration::from_secs(30), |l| {
        l.iter().filter(|x| x.starts_with("seq=")).count() >= seen + 10
    });
    // Back to a guest, though the host's CPU has extensions the TCG
    // guests' lacks (AVX-512 here): the program picked its code in the
    // guest, where it started, and its image says so.
    let back_pid = migrate_json(&m, host_pid as u32, "host", at, "lazy")["new_pid"]
        .as_u64()
        .expect("new_pid") as u32;
    assert_eq!(pid_on(&m, at), back_pid);
    assert!(
        !std::path::Path::new(&format!("/proc/{host_pid}")).exists(),
        "the host still holds {host_pid}"
    );
    let seen = w.count("seq=");
    w.wait_for("output after going back", Duration::from_secs(30), |l| {
        l.iter().filter(|x| x.starts_with("seq=")).count() >= seen + 10
    });
    // A program started on the host picked its code for the host's
    // CPU: refused by the guest, naming what it lacks, before anything
    // is frozen, and it runs on. Started with glibc told to pick none of
    // that (the refusal says how), `--any-cpu` moves it, and it counts on
    // in the guest.
    let missing: Vec<&String> = host.iter().filter(|f| !guest.contains(f)).collect();
    if !missing.is_empty() {
        let tunables = cpu::glibc_tunables_without(&missing);
        eprintln!("{at} lacks {missing:?} of the host's extensions; a host program starts with {tunables:?}");
        let mut native = std::process::Command::new(mkctl_e2e::host_testprog("mkcounter"));
        if let Some((k, v)) = tunables.as_deref().and_then(|t| t.split_once('=')) {
            native.env(k, v);
        }
        let mut native = native
            .args(["--mem", "1M", "--interval-ms", "20"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Not the test's: a file the guest has not.
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = mkctl_e2e::collect_lines(native.stdout.take().unwrap());
        let n = native.id().to_string();
        // Ten more lines within 30 s, or `why`.
        let ten_more = |why: &str| {
            let seen = lines.lock().unwrap().len();
            let deadline = Instant::now() + Duration::from_secs(30);
            while lines.lock().unwrap().len() < seen + 10 {
                assert!(Instant::now() < deadline, "{why}");
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let refused = m.run(&["migrate", &n, "--from", "host", "--to", at, "--json"]);
        assert_eq!(refused.code, 1, "{refused:?}");
        let e = refused.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            e.contains(&format!(
                "{at} could not restore the process: this CPU lacks"
            )) && missing.iter().all(|f| e.contains(f.as_str()))
                && e.contains("nothing was frozen"),
            "missing {missing:?}: {e}"
        );
        ten_more("the refused host program stopped");
        let moved = m
            .run(&[
                "migrate",
                &n,
                "--from",
                "host",
                "--to",
                at,
                "--any-cpu",
                "--json",
            ])
            .ok();
        let copy = moved.json()["new_pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("{moved:?}"));
        ten_more(&format!(
            "the host program moved with --any-cpu stopped ({tunables:?})"
        ));
        no_gap(&mkctl_e2e::seq_numbers(&lines.lock().unwrap()));
        m.run(&["exec", at, "--", "kill", "-KILL", &copy.to_string()])
            .ok();
        native.wait().unwrap();
    } else {
        // Said, not silent: this host has no extension the guest lacks,
        // so no host program can be refused by it.
        eprintln!(
            "NOT RUN: the refusal and --any-cpu part (the guest has every extension of this host)"
        );
    }
    no_gap(&w.seqs());
    // Its end comes back to the exec on the host: SIGTERM is 128 + 15.
    m.run(&["exec", at, "--", "kill", "-TERM", &back_pid.to_string()])
        .ok();
    let st = w.child.wait().unwrap();
    assert_eq!(st.code(), Some(143));
    no_gap(&w.seqs());
}

#[test]
fn destination_dying_mid_transfer_leaves_the_original_running() {
    let m = boot();
    let w = start(&m, "alpha", "64M");
    let pid = pid_on(&m, "alpha");
    usr1(&m, "alpha", pid);
    w.wait_for("checksum", Duration::from_secs(20), |l| {
        l.iter().any(|x| x.starts_with("checksum="))
    });
    let st = m.run(&["status", "--json"]).ok().json();
    let beta_qemu = st["daemon"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "beta")
        .and_then(|i| i["pid"].as_u64())
        .unwrap();
    // Kill beta's kernel while the image is on its way.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        std::process::Command::new("kill")
            .args(["-9", &beta_qemu.to_string()])
            .status()
            .unwrap();
    });
    let r = m.run(&[
        "migrate",
        &pid.to_string(),
        "--from",
        "alpha",
        "--to",
        "beta",
        "--mode",
        "stop-copy",
    ]);
    killer.join().unwrap();
    assert_eq!(r.code, 1, "the move must fail: {}", r.text());
    assert!(r.stderr.contains("the original runs on"), "{}", r.stderr);
    // Same process, still printing, same memory.
    runs_on(&m, &w, pid);
    usr1(&m, "alpha", pid);
    w.wait_for("second checksum", Duration::from_secs(20), |l| {
        l.iter().filter(|x| x.starts_with("checksum=")).count() >= 2
    });
    let c = w.checksums();
    assert_eq!(c[0], c[1]);
    no_gap(&w.seqs());
}

#[test]
fn checkpoint_on_alpha_restores_on_beta_and_goes_with_its_mkctl() {
    let m = boot();
    let mut w = start(&m, "alpha", "8M");
    let pid = pid_on(&m, "alpha");
    usr1(&m, "alpha", pid);
    w.wait_for("checksum", Duration::from_secs(20), |l| {
        l.iter().any(|x| x.starts_with("checksum="))
    });
    let before = w.checksums()[0].clone();
    let img = m.run_dir().join("counter.img");
    let img_s = img.display().to_string();
    let said = m
        .run(&[
            "checkpoint",
            &pid.to_string(),
            "--on",
            "alpha",
            "--kill",
            "--json",
            "-o",
            &img_s,
        ])
        .ok()
        .json();
    // What it says is what it wrote; the freeze is the agent's, not timed.
    assert_eq!(
        said["bytes"],
        std::fs::metadata(&img).expect("the image").len(),
        "{said}"
    );
    assert_eq!(said["processes"], 1, "{said}");
    assert_eq!(said["killed"], true, "{said}");
    assert!(said["frozen_seconds"].is_null(), "{said}");
    // Stopped once saved: the exec ends with SIGKILL's status.
    assert_eq!(w.child.wait().unwrap().code(), Some(128 + 9));
    std::thread::sleep(Duration::from_millis(200));
    let last = *w.seqs().last().expect("output before the checkpoint");

    let child = m
        .command()
        .args(["restore", &img_s, "--on", "beta"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let r = watch(child);
    r.wait_for("12 lines after the restore", Duration::from_secs(30), |l| {
        l.iter().filter(|x| x.starts_with("seq=")).count() >= 12
    });
    assert_eq!(
        r.seqs()[0],
        last + 1,
        "the restored process goes on from the next line"
    );
    no_gap(&r.seqs());
    let pid2 = pid_on(&m, "beta");
    usr1(&m, "beta", pid2);
    r.wait_for("checksum after the restore", Duration::from_secs(20), |l| {
        l.iter().any(|x| x.starts_with("checksum="))
    });
    assert_eq!(r.checksums()[0], before, "memory changed");

    // The restored process goes with the mkctl that runs it, as with exec.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    until_empty(
        &m,
        "beta",
        "pidof mkcounter",
        Duration::from_secs(20),
        |left| format!("mkcounter {left:?} outlived its mkctl restore"),
    );

    // A process started in the background is an orphan, a child of the
    // guest's PID 1, where the agent runs. Saving and moving it must not
    // hang with it frozen (PID 1's reaper once took the ptrace stops the
    // capture waited for), and the original must be reaped after the move.
    m.run(&[
        "exec",
        "beta",
        "--",
        "sh",
        "-c",
        "mkcounter --mem 1M --interval-ms 100 >/dev/null 2>&1 &",
    ])
    .ok();
    let bg = pid_on(&m, "beta");
    let img2 = m.run_dir().join("bg.img").display().to_string();
    // Each within a minute (the hang lasted until the client gave up).
    let bounded = |args: &[&str]| {
        let mut c = m.command().args(args).spawn().unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "mkctl {args:?}: {st:?}");
                return;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                panic!("mkctl {args:?} hung");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    bounded(&["checkpoint", &bg.to_string(), "--on", "beta", "-o", &img2]);
    bounded(&[
        "migrate",
        &bg.to_string(),
        "--from",
        "beta",
        "--to",
        "alpha",
    ]);
    until_empty(
        &m,
        "beta",
        &format!("cat /proc/{bg}/stat 2>/dev/null"),
        Duration::from_secs(10),
        |left| format!("the original {bg} was not reaped on beta: {left}"),
    );
    assert!(pid_on(&m, "alpha") > 0);
}

/// A process with a file open that only its kernel has: the move is refused
/// before anything is frozen, naming the file, and the process runs on.
#[test]
fn a_file_the_destination_lacks_is_named_before_the_freeze() {
    let m = boot();
    let w = exec_watched(
        &m,
        "alpha",
        &[
            "sh",
            "-c",
            "echo here > /tmp/only-alpha && exec 7</tmp/only-alpha && exec /bin/mkcounter --mem 1M --interval-ms 20",
        ],
    );
    let pid = pid_on(&m, "alpha");
    let r = refused_move(&m, pid);
    assert!(
        r.stderr.contains("/tmp/only-alpha") && r.stderr.contains("nothing was frozen"),
        "{}",
        r.stderr
    );
    runs_on(&m, &w, pid);
    no_gap(&w.seqs());
}

/// The number after `name=` in a line.
fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))?
        .parse()
        .ok()
}

/// A timerfd, a signalfd, a pipe with bytes in flight, two socket pairs
/// with bytes and datagrams queued, an epoll, a memfd (on a descriptor
/// and mapped shared) and an eventfd move between the guests
/// (Linux 6.1) with the process, lazily and back by stop-copy: after each
/// hop the process finds its one-shot timer's unread expiration, the
/// pipe's 40001 bytes byte for byte (and its ends connected, its dup still
/// sharing), the socket pairs' queues likewise, its epoll's watches (a
/// wait, a wake, a change by number), its POSIX timers (same ids, one
/// signalling the main thread) firing on, reads as many periodic expirations
/// as whole periods its clock says passed, and reads SIGUSR2 sent on the
/// new kernel from its signalfd.
#[test]
fn timerfd_signalfd_and_pipe_move_between_guests() {
    let m = boot();
    let w = exec_watched(
        &m,
        "alpha",
        &[
            "/bin/mkcounter",
            "--mem",
            "1M",
            "--interval-ms",
            "40",
            "--timerfd-ms",
            "5",
            "--signalfd",
            "--pipe-inflight",
            "40001",
            "--socketpairs",
            "40001",
            "--epoll",
            "--posix-timer-ms",
            "10",
            // Small: its check runs on the main thread, between timerfd
            // reads (a TCG guest checks 1 MiB in ~170 ms).
            "--memfd",
            "64K",
            "--eventfd",
            "42",
        ],
    );
    let mut pid = pid_on(&m, "alpha");
    let mut at = "alpha";
    for (hop, mode) in ["lazy", "stop-copy"].into_iter().enumerate() {
        let to = if at == "alpha" { "beta" } else { "alpha" };
        let seen = w.lines.lock().unwrap().len();
        pid = migrate_json(&m, pid, at, to, mode)["new_pid"]
            .as_u64()
            .unwrap() as u32;
        at = to;
        w.wait_for("the checks after the move", Duration::from_secs(30), |l| {
            l[seen..].iter().any(|x| x.starts_with("pipe_check="))
                && l[seen..].iter().any(|x| x.starts_with("socket_check="))
                && l[seen..].iter().any(|x| x.starts_with("epoll_check="))
                && l[seen..].iter().any(|x| x.starts_with("memfd_check="))
                && l[seen..]
                    .iter()
                    .any(|x| field(x, "timerfd_oneshot").is_some())
        });
        let after: Vec<String> = w.lines.lock().unwrap()[seen..].to_vec();
        let check = after.iter().find(|x| x.starts_with("pipe_check=")).unwrap();
        assert_eq!(check, "pipe_check=ok shared=1", "hop {hop}: {after:?}");
        for (what, ok) in [
            ("socket_check=", "socket_check=ok"),
            ("epoll_check=", "epoll_check=ok"),
            ("memfd_check=", "memfd_check=ok"),
        ] {
            let check = after.iter().find(|x| x.starts_with(what)).unwrap();
            assert_eq!(check, ok, "hop {hop}: {after:?}");
        }
        // POSIX timers go on with their ids (id 2 on the main thread).
        let fired = w.lines.lock().unwrap()[..seen]
            .iter()
            .rev()
            .find_map(|x| field(x, "ptimer_fires"))
            .unwrap_or(0);
        w.wait_for(
            "POSIX timers firing after the move",
            Duration::from_secs(30),
            |l| {
                l[seen..]
                    .iter()
                    .any(|x| field(x, "ptimer_fires").is_some_and(|f| f >= fired + 10))
            },
        );
        let last = w
            .lines
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|x| field(x, "ptimer_bad").is_some())
            .unwrap()
            .clone();
        assert_eq!(field(&last, "ptimer_bad"), Some(0), "hop {hop}: {last}");
        assert!(last.contains(" ptimer_ids=ok "), "hop {hop}: {last}");
        // The eventfd, whose mode the 6.1 kernel's fdinfo does not show
        // (found by trying it), has its count where it arrived.
        let script = format!(
            "for f in /proc/{pid}/fd/*; do [ \"$(readlink $f)\" = 'anon_inode:[eventfd]' ] && cat /proc/{pid}/fdinfo/${{f##*/}}; done; true"
        );
        let info = m.run(&["exec", at, "--", "sh", "-c", &script]).ok().text();
        assert!(
            info.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["eventfd-count:", "2a"]),
            "hop {hop}: {info}"
        );
        let oneshot = after
            .iter()
            .find_map(|x| field(x, "timerfd_oneshot"))
            .unwrap();
        // The first hop carries the expiration that happened at start; the
        // second finds it read already.
        assert_eq!(oneshot, u64::from(hop == 0), "hop {hop}: {after:?}");
        let usr2 = after
            .iter()
            .rev()
            .find_map(|x| field(x, "sigusr2"))
            .unwrap();
        m.run(&["exec", at, "--", "kill", "-USR2", &pid.to_string()])
            .ok();
        let seen2 = w.lines.lock().unwrap().len();
        w.wait_for(
            "SIGUSR2 read from the signalfd",
            Duration::from_secs(20),
            |l| {
                l[seen2..]
                    .iter()
                    .any(|x| field(x, "sigusr2") == Some(usr2 + 1))
            },
        );
        w.wait_for("40 more expirations", Duration::from_secs(30), |l| {
            l[seen2..]
                .iter()
                .filter(|x| field(x, "timerfd_fires").is_some())
                .count()
                >= 8
        });
        let lines = w.lines.lock().unwrap().clone();
        let timed: Vec<(u64, u64, &String)> = lines[seen..]
            .iter()
            .filter_map(|l| Some((field(l, "timerfd_fires")?, field(l, "timerfd_due")?, l)))
            .collect();
        for &(f, d, l) in &timed {
            // Never ahead (the bug fixed: 4-5 periods ahead after a stall).
            assert!(
                f <= d + 1,
                "hop {hop}: {f} expirations read where {d} periods passed: {l}"
            );
            // Behind for a while is the TCG guest's: its clock reads the
            // (host's) time stamp counter at once while the timer
            // interrupts that fire the timers wait for the vCPU and QEMU's
            // timer thread; on a loaded host 100+ periods (seen in CI on
            // the first line after a move). Shown, not failed: a lost
            // expiration stays lost, which the last line shows.
            if f + 6 < d {
                eprintln!("hop {hop}: {} periods behind for now: {l}", d - f);
            }
        }
        let &(f, d, l) = timed.last().expect("timerfd lines after the move");
        assert!(
            f + 6 >= d,
            "hop {hop}: {f} expirations read where {d} periods passed, 8 lines after the move's checks: {l}; around the move: {:?}",
            &lines[seen.saturating_sub(3)..]
        );
        assert!(
            w.lines.lock().unwrap()[seen..]
                .iter()
                .all(|x| field(x, "pipe_bytes").is_none_or(|b| b == 40001)),
            "hop {hop}: the pipe lost or gained bytes"
        );
    }
    no_gap(&w.seqs());
}

/// A kernel without an AF_UNIX sock_diag (Debian builds `unix_diag` as a
/// module; guest-init loads it, and here it is unloaded again): a process
/// with a socket pair is refused by name before anything is frozen, saying
/// why, and runs on.
#[test]
fn a_socket_pair_is_refused_by_name_where_sock_diag_is_missing() {
    let m = boot();
    m.run(&["exec", "alpha", "--", "busybox", "rmmod", "unix_diag"])
        .ok();
    let w = exec_watched(
        &m,
        "alpha",
        &[
            "/bin/mkcounter",
            "--mem",
            "1M",
            "--interval-ms",
            "20",
            "--socketpairs",
            "100",
        ],
    );
    let pid = pid_on(&m, "alpha");
    let r = refused_move(&m, pid);
    assert!(
        r.stderr.contains("is a socket (socket:[")
            && r.stderr.contains("sock_diag does not describe"),
        "{}",
        r.stderr
    );
    runs_on(&m, &w, pid);
    no_gap(&w.seqs());
}

/// The pids a `cat /proc/<pid>/task/<pid>/children` on `on` lists.
fn children_on(m: &Mkctl, on: &str, pid: u32) -> Vec<u32> {
    let script = format!("cat /proc/{pid}/task/{pid}/children 2>/dev/null; true");
    m.run(&["exec", on, "--", "sh", "-c", &script])
        .ok()
        .text()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// `--tree`: a busybox shell loop (a `sleep` child forked for every line,
/// and one long-lived child) piped through `cat` moves alpha -> beta
/// (stop-and-copy) -> alpha (lazily: `--mode lazy`) with its children. Without `--tree` it is refused by name and
/// runs on. Its lines go on with no gap or repeat (through the pipe
/// between the loop and `cat`, carried with the tree); the shell's pid as
/// it knows it (`$$`) and its long child's stay, and its end comes back
/// to the exec.
#[test]
fn a_shell_loop_with_its_children_moves_with_tree() {
    let m = boot();
    // (busybox runs `sleep` by executing /proc/self/exe: the copy's must
    // be busybox again, not the agent that restored it.)
    let script = "sleep 1000 & echo long=$!; i=0; while true; do echo \"seq=$i pid=$$\"; i=$((i+1)); sleep 0.2 & wait $! || echo sleep_failed=$?; done | cat";
    let mut w = exec_watched(&m, "alpha", &["sh", "-c", script]);
    let first = |prefix: &str| -> u32 {
        w.lines
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} line"))
    };
    let long = first("long=");
    let sh = w
        .lines
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| field(l, "pid"))
        .expect("a line with the shell's pid") as u32;
    assert!(children_on(&m, "alpha", sh).contains(&long));

    let r = refused_move(&m, sh);
    assert!(
        r.stderr.contains("has child processes") && r.stderr.contains("--tree"),
        "{}",
        r.stderr
    );
    let (mut pid, mut at) = (sh, "alpha");
    for (to, mode) in [("beta", "stop-copy"), ("alpha", "lazy")] {
        let out = m
            .run(&[
                "migrate",
                &pid.to_string(),
                "--from",
                at,
                "--to",
                to,
                "--tree",
                "--mode",
                mode,
                "--json",
            ])
            .ok();
        let j = out.json();
        eprintln!("--tree {at} -> {to}: {j}");
        let want = if mode == "lazy" { "lazy-tree" } else { "tree" };
        assert_eq!(j["mode"], want, "{j}");
        let new_pid = j["new_pid"].as_u64().expect("new_pid") as u32;
        // The shell runs there with its long child (the pid ns's numbers
        // are the ones it knows; the kernel's own differ).
        let kids = children_on(&m, to, new_pid);
        assert!(!kids.is_empty(), "the shell on {to} has no children");
        let ns = m
            .run(&[
                "exec",
                to,
                "--",
                "sh",
                "-c",
                // (A short sleep may be gone by now.)
                &format!(
                    "grep NSpid /proc/{new_pid}/status; for k in {}; do grep NSpid /proc/$k/status 2>/dev/null; done; true",
                    kids.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(" ")
                ),
            ])
            .ok()
            .text();
        let mut lines = ns.lines();
        assert!(
            lines
                .next()
                .is_some_and(|l| l.ends_with(&format!("\t{sh}"))),
            "the shell is {sh} in its namespace: {ns}"
        );
        assert!(
            ns.lines().any(|l| l.ends_with(&format!("\t{long}"))),
            "the long child is {long} in its namespace: {ns}"
        );
        // The origin no longer runs it.
        until_empty(
            &m,
            at,
            &format!("[ -e /proc/{pid} ] && cut -d' ' -f3 /proc/{pid}/stat"),
            Duration::from_secs(30),
            |left| format!("{at} still holds the shell {pid}: {left}"),
        );
        let seen = w.count("seq=");
        w.wait_for("output after the move", Duration::from_secs(30), |l| {
            l.iter().filter(|x| x.starts_with("seq=")).count() >= seen + 10
        });
        (pid, at) = (new_pid, to);
    }
    no_gap(&w.seqs());
    let lines = w.lines.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .filter_map(|l| field(l, "pid"))
            .all(|p| p == u64::from(sh)),
        "$$ stayed {sh}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("sleep_failed")),
        "a child's sleep failed: {lines:?}"
    );
    // The end: the shell, then its children (the tree's end is its top's,
    // once all of it has ended). Some may be gone by the time `kill` gets
    // to them (the pipeline ends with its last process): its status is
    // not the test's.
    let kids = children_on(&m, at, pid);
    let all: Vec<String> = std::iter::once(&pid)
        .chain(&kids)
        .map(|p| p.to_string())
        .collect();
    let mut args = vec!["exec", at, "--", "kill", "-TERM"];
    args.extend(all.iter().map(String::as_str));
    m.run(&args);
    let st = w.child.wait().unwrap();
    assert_eq!(st.code(), Some(143));
}
