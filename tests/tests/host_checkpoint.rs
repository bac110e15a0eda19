//! `mkctl checkpoint --on host` and `mkctl restore --on host`: Telefork's
//! save and restore on the host kernel, done by mkctl itself (no daemon, no
//! guest). A multithreaded `mkcounter` is saved while it runs on, saved
//! again and stopped, and restored as mkctl's child: its output goes on
//! from the next line with no gap or repeat, its memory checksum is the
//! same, and a signal to mkctl reaches it and its end becomes mkctl's exit
//! status. A process that cannot be
//! saved is refused by name and keeps running, and no image is left.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use mkctl_e2e::{cache_dir, mkctl_bin, Scratch};

const T: Duration = Duration::from_secs(20);

/// Lines of a process's stdout, read in the background.
fn lines(out: ChildStdout) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

fn seq(line: &str) -> Option<u64> {
    line.strip_prefix("seq=")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Reads until a line satisfies `f`; returns every line read.
fn until(rx: &Receiver<String>, f: impl Fn(&str) -> bool) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let l = rx
            .recv_timeout(T)
            .unwrap_or_else(|_| panic!("timed out; lines so far: {got:?}"));
        let done = f(&l);
        got.push(l);
        if done {
            return got;
        }
    }
}

fn usr1(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("SIGUSR1");
}

fn checksum(rx: &Receiver<String>, pid: u32) -> String {
    usr1(pid);
    until(rx, |l| l.starts_with("checksum="))
        .pop()
        .expect("a checksum line")
}

/// `bash -c "<setup>; exec mkcounter <args>"` with every descriptor above 2
/// closed first: the test harness may leak some into its children, and a
/// process holding one cannot be saved (rightly).
fn mkcounter_cmd(setup: &str, args: &str) -> Command {
    let prog = cache_dir().join("mkcounter");
    assert!(
        prog.is_file(),
        "{} is missing: run ./qemu/setup.sh",
        prog.display()
    );
    let mut c = Command::new("bash");
    c.arg("-c").arg(format!(
        "for f in /proc/$$/fd/*; do n=${{f##*/}}; [ \"$n\" -gt 2 ] && eval \"exec $n>&-\"; done 2>/dev/null; {setup} exec {} {args}",
        prog.display()
    ));
    c
}

/// mkcounter started as [`mkcounter_cmd`] says, its output read in the
/// background, once it has printed a few lines.
fn mkcounter_running(setup: &str, args: &str) -> (Child, Receiver<String>) {
    let mut child = mkcounter_cmd(setup, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mkcounter");
    let rx = lines(child.stdout.take().expect("stdout"));
    until(&rx, |l| seq(l).is_some_and(|s| s >= 5));
    (child, rx)
}

fn mkctl() -> Command {
    let mut c = Command::new(mkctl_bin());
    // No daemon is involved: point the run dir somewhere empty to prove it.
    c.env("MKCTL_RUN_DIR", "/nonexistent/mkctl-host-checkpoint");
    c
}

/// A `mkctl restore` just spawned: its output lines, its stderr after the
/// first line, that line (`mkctl: restored ... as pid N`) and the pid in it.
fn restoring(r: &mut Child) -> (Receiver<String>, BufReader<ChildStderr>, String, u32) {
    let out = lines(r.stdout.take().expect("stdout"));
    let mut err = BufReader::new(r.stderr.take().expect("stderr"));
    let mut said = String::new();
    err.read_line(&mut said).expect("stderr line");
    let pid = said
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {said:?}"));
    (out, err, said, pid)
}

/// `mkctl restore --on host <img>` running, its output piped.
fn restore_running(img: &std::path::Path) -> Child {
    mkctl()
        .args(["restore", "--on", "host"])
        .arg(img)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mkctl restore")
}

/// SIGTERM to a running `mkctl restore` (it passes it on), then its end.
fn end(r: &mut Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = r.wait();
}

/// SIGTERM to a running `mkctl restore` whose stderr (after its first
/// line) is `err`: it must pass it on and end with the status it gives,
/// 128 + 15.
fn terminated(r: &mut Child, err: &mut BufReader<ChildStderr>) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM to mkctl restore");
    let mut rest = String::new();
    let _ = err.read_to_string(&mut rest);
    let status = r.wait().expect("mkctl restore ends");
    assert_eq!(status.code(), Some(128 + 15), "{rest}");
}

/// `mkctl checkpoint <pid> --on host [--kill] -o <img>`.
fn checkpoint(pid: u32, kill: bool, img: &std::path::Path) -> std::process::Output {
    checkpoint_with(pid, if kill { &["--kill"] } else { &[] }, img)
}

/// `mkctl checkpoint <pid> --on host <flags> -o <img>`.
fn checkpoint_with(pid: u32, flags: &[&str], img: &std::path::Path) -> std::process::Output {
    mkctl()
        .args(["checkpoint", &pid.to_string(), "--on", "host"])
        .args(flags)
        .arg("-o")
        .arg(img)
        .output()
        .expect("mkctl checkpoint")
}

/// `checkpoint --kill` of `pid` into `img`, which must work.
fn save_and_stop(pid: u32, img: &std::path::Path) {
    let out = checkpoint(pid, true, img);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn checkpoint_and_restore_on_the_host() {
    let dir = Scratch::new("host_checkpoint");
    let (mut child, rx) = mkcounter_running("", "--mem 8M --interval-ms 5");
    let pid = child.id();
    let sum = checksum(&rx, pid);

    // A checkpoint that lets the process go on.
    let first = dir.join("running.img");
    let out = checkpoint_with(pid, &["--json"], &first);
    assert!(out.status.success(), "{out:?}");
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let len = std::fs::metadata(&first).expect("the image").len();
    assert_eq!(said["bytes"], len, "{said}");
    assert_eq!(said["pid"], pid, "{said}");
    assert_eq!(said["on"], "host", "{said}");
    assert_eq!(said["processes"], 1, "{said}");
    assert_eq!(said["killed"], false, "{said}");
    assert_eq!(said["tree"], false, "{said}");
    let (took, frozen) = (said["seconds"].as_f64(), said["frozen_seconds"].as_f64());
    assert!(frozen.is_some_and(|f| f > 0.0 && Some(f) <= took), "{said}");
    let after = until(&rx, |l| seq(l).is_some());
    let s1 = after.iter().filter_map(|l| seq(l)).next().expect("seq");
    let seen = until(&rx, |l| seq(l).is_some_and(|s| s >= s1 + 10));
    let mut last = seen.iter().filter_map(|l| seq(l)).next_back().expect("seq");

    // A checkpoint that stops it: its output ends.
    let img = dir.join("stopped.img");
    save_and_stop(pid, &img);
    while let Ok(l) = rx.recv_timeout(T) {
        if let Some(s) = seq(&l) {
            assert_eq!(s, last + 1, "gap or repeat before the checkpoint");
            last = s;
        }
    }
    let _ = child.wait();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!img.with_extension("partial").exists());

    // Restored here: the next line is the next number.
    let mut r = restore_running(&img);
    let (rx2, mut err, _, new_pid) = restoring(&mut r);
    let got = until(&rx2, |l| seq(l).is_some());
    assert_eq!(
        got.iter().filter_map(|l| seq(l)).next(),
        Some(last + 1),
        "output after the restore must go on from seq {last}: {got:?}"
    );
    assert_eq!(checksum(&rx2, new_pid), sum, "memory changed");
    let more = until(&rx2, |l| seq(l).is_some_and(|s| s >= last + 20));
    let seqs: Vec<u64> = more.iter().filter_map(|l| seq(l)).collect();
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "gap or repeat after the restore");
    }
    // SIGTERM to mkctl reaches the process (as with exec), whose end
    // becomes mkctl's status.
    terminated(&mut r, &mut err);
    assert!(
        !std::path::Path::new(&format!("/proc/{new_pid}")).exists(),
        "the restored process outlived mkctl"
    );
}

#[test]
fn refused_checkpoint_leaves_the_process_running_and_no_file() {
    let dir = Scratch::new("host_checkpoint_refused");
    // An open file the image cannot carry: it was deleted.
    let gone = dir.join("gone");
    let (mut child, rx) = mkcounter_running(
        &format!("exec 7<>{0}; rm {0};", gone.display()),
        "--mem 1M --interval-ms 5",
    );
    let pid = child.id();
    let img = dir.join("never.img");
    let out = checkpoint(pid, true, &img);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fd 7")
            && err.contains(&gone.display().to_string())
            && err.contains("deleted"),
        "{err}"
    );
    assert!(!img.exists() && !img.with_extension("partial").exists());
    // Still running, still printing.
    let l = until(&rx, |l| seq(l).is_some());
    let s = seq(l.last().expect("line")).expect("seq");
    until(&rx, |l| seq(l).is_some_and(|x| x >= s + 10));
    let _ = child.kill();
    let _ = child.wait();
}

/// `-o -` and `restore -`: the image goes through a pipe between two mkctl
/// processes, nothing is written to disk, and the output goes on from the
/// next number.
#[test]
fn checkpoint_to_stdout_restores_from_stdin() {
    let dir = Scratch::new("host_checkpoint_pipe");
    let (mut child, rx) = mkcounter_running("", "--mem 4M --interval-ms 5");
    let pid = child.id();
    let sum = checksum(&rx, pid);
    let mut save = mkctl()
        .args([
            "checkpoint",
            &pid.to_string(),
            "--on",
            "host",
            "--kill",
            "-o",
            "-",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mkctl checkpoint -o -");
    let pipe = save.stdout.take().expect("stdout");
    let mut r = mkctl()
        .args(["restore", "-", "--on", "host"])
        .stdin(Stdio::from(pipe))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mkctl restore -");
    let saved = save.wait_with_output().expect("checkpoint ends");
    let said = String::from_utf8_lossy(&saved.stderr);
    assert!(saved.status.success(), "{said}");
    assert!(said.contains("to stdout ("), "{said}");
    // The original's last lines, then its end.
    let mut last = 0;
    while let Ok(l) = rx.recv_timeout(T) {
        if let Some(s) = seq(&l) {
            last = s;
        }
    }
    let _ = child.wait();
    assert!(
        std::fs::read_dir(dir.path())
            .expect("scratch dir")
            .next()
            .is_none(),
        "-o - wrote a file"
    );
    let (rx2, _, line, new_pid) = restoring(&mut r);
    assert!(line.contains("from stdin"), "{line}");
    let got = until(&rx2, |l| seq(l).is_some());
    assert_eq!(got.iter().filter_map(|l| seq(l)).next(), Some(last + 1));
    assert_eq!(checksum(&rx2, new_pid), sum, "memory changed");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert_eq!(r.wait().expect("restore ends").code(), Some(143));
}

/// The last `seq=` number in a file of mkcounter lines, checking on the way
/// that they count up by one (a line overwritten or lost would break it).
fn last_seq_in(path: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(path).expect("read the log");
    let seqs: Vec<u64> = text.lines().filter_map(seq).collect();
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "gap or repeat in {}", path.display());
    }
    *seqs.last().expect("some lines")
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < T, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `./prog >> run.log &`, with more files open: saved and restored on the
/// host, the process writes on at the end of the same log (flags kept:
/// O_APPEND), a file it reads keeps its offset, a device stays open. A log
/// that changed after the save is refused at restore, by name.
#[test]
fn files_on_any_descriptor_are_carried() {
    let dir = Scratch::new("host_checkpoint_files");
    let log = dir.join("run.log");
    let data = dir.join("data");
    std::fs::write(&data, b"0123456789").unwrap();
    let mut child = mkcounter_cmd(
        &format!(
            "exec 5</dev/urandom 6<{}; dd bs=1 count=3 <&6 >/dev/null 2>&1;",
            data.display()
        ),
        "--mem 1M --interval-ms 5",
    )
    .stdin(Stdio::null())
    .stdout(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap(),
    )
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn mkcounter");
    let pid = child.id();
    wait_for("a few lines in the log", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().filter_map(seq).count() >= 5)
    });
    let img = dir.join("files.img");
    save_and_stop(pid, &img);
    let _ = child.wait();
    let last = last_seq_in(&log);

    let mut r = restore_running(&img);
    let (_, _err, said, new_pid) = restoring(&mut r);
    let fd = |n: u32| std::fs::read_link(format!("/proc/{new_pid}/fd/{n}")).unwrap();
    assert_eq!(fd(1), log, "{said}");
    assert_eq!(fd(5), std::path::Path::new("/dev/urandom"));
    assert_eq!(fd(6), data);
    let info = |n: u32| std::fs::read_to_string(format!("/proc/{new_pid}/fdinfo/{n}")).unwrap();
    assert!(info(6).contains("pos:\t3\n"), "{}", info(6));
    let flags = info(1)
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
        .unwrap();
    assert_ne!(
        flags & nix::libc::O_APPEND as u32,
        0,
        "O_APPEND lost: {flags:o}"
    );
    wait_for("the restored process to write on", || {
        last_seq_in(&log) >= last + 10
    });

    // Saved again, then the log grows: it is not the same file any more.
    let img2 = dir.join("files2.img");
    let out = checkpoint(new_pid, true, &img2);
    assert!(out.status.success(), "{out:?}");
    let _ = r.wait();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(b"a line written meanwhile\n")
        .unwrap();
    let out = mkctl()
        .args(["restore", "--on", "host"])
        .arg(&img2)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fd 1")
            && err.contains(&log.display().to_string())
            && err.contains("not the same file"),
        "{err}"
    );
}

/// `mono_ms=` of an mkcounter line.
fn mono_ms(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("mono_ms="))?
        .parse()
        .ok()
}

/// Saved, left 3 s, restored: the process's CLOCK_MONOTONIC goes on from
/// where it stopped (a time namespace with offsets), instead of jumping by
/// the time it was away (or, on another kernel, by the difference of boot
/// times, backwards too).
#[test]
fn clocks_go_on_from_where_they_stopped() {
    let dir = Scratch::new("host_checkpoint_clocks");
    let (mut child, rx) = mkcounter_running("", "--mem 1M --interval-ms 5");
    let pid = child.id();
    // A value seen before the save (the lines read so far are gone).
    let mut last = until(&rx, |l| mono_ms(l).is_some())
        .iter()
        .find_map(|l| mono_ms(l));
    let img = dir.join("clocks.img");
    save_and_stop(pid, &img);
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        last = mono_ms(&l).or(last);
    }
    let _ = child.wait();
    let before = last.expect("a mono_ms before the checkpoint");
    std::thread::sleep(Duration::from_secs(3));
    let mut r = restore_running(&img);
    let (rx2, _err, _, new_pid) = restoring(&mut r);
    let got = until(&rx2, |l| mono_ms(l).is_some());
    let after = got.iter().find_map(|l| mono_ms(l)).unwrap();
    assert!(
        after >= before && after < before + 1500,
        "CLOCK_MONOTONIC went from {before} ms to {after} ms over a 3 s absence"
    );
    let offsets = std::fs::read_to_string(format!("/proc/{new_pid}/timens_offsets")).unwrap();
    assert!(
        offsets.contains("monotonic") && !offsets.contains("monotonic           0"),
        "{offsets}"
    );
    end(&mut r);
}

/// `alarms=` of an mkcounter line.
fn alarms(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("alarms="))?
        .parse()
        .ok()
}

/// An interval timer (`setitimer`, as `alarm` uses) goes on firing after a
/// save and restore: the count of SIGALRMs keeps rising.
#[test]
fn interval_timers_go_on() {
    let dir = Scratch::new("host_checkpoint_itimer");
    // A period shorter than any freeze: the timer expires while the
    // process is stopped, its SIGALRM pending (the kernel re-arms it only
    // when the process takes that signal). A slower timer made this case
    // rare, and the move then disarmed it for good.
    let (mut child, rx) = mkcounter_running("", "--mem 1M --interval-ms 5 --alarm-ms 2");
    let pid = child.id();
    let mut last = until(&rx, |l| alarms(l).is_some_and(|a| a > 0))
        .iter()
        .find_map(|l| alarms(l));
    let img = dir.join("itimer.img");
    save_and_stop(pid, &img);
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        last = alarms(&l).or(last);
    }
    let _ = child.wait();
    let before = last.expect("an alarms= line before the checkpoint");
    assert!(before > 0, "the timer never fired before the checkpoint");
    let mut r = restore_running(&img);
    let (rx2, _err, _, _) = restoring(&mut r);
    // 20 more alarms: 40 ms at one every 2 ms.
    until(&rx2, |l| alarms(l).is_some_and(|a| a >= before + 20));
    end(&mut r);
}

/// POSIX timers move with their ids, signals, values and targets: all
/// go on firing after a save and restore (the thread-directed one on the
/// main thread, with its value; the one on the process's CPU clock as a
/// worker computes), periods shorter than the freeze included, and the id
/// deleted before the move stays free.
#[test]
fn posix_timers_go_on_with_their_ids() {
    let dir = Scratch::new("host_checkpoint_ptimers");
    let (mut child, rx) = mkcounter_running(
        "",
        "--mem 1M --interval-ms 5 --posix-timer-ms 2 --threads 1",
    );
    let pid = child.id();
    let fires = |l: &str| {
        field(l, "ptimer_fires")
            .zip(field(l, "ptimer_tid_fires"))
            .zip(field(l, "ptimer_cpu_fires"))
            .map(|((a, b), c)| (a, b, c))
    };
    let mut last = until(&rx, |l| {
        fires(l).is_some_and(|(a, b, c)| a > 0 && b > 0 && c > 0)
    })
    .iter()
    .rev()
    .find_map(|l| fires(l));
    let img = dir.join("ptimers.img");
    save_and_stop(pid, &img);
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        last = fires(&l).or(last);
    }
    let _ = child.wait();
    let (p0, t0, c0) = last.expect("a ptimer line before the checkpoint");
    let mut r = restore_running(&img);
    let (rx2, _err, _, _) = restoring(&mut r);
    // 20 more of each: 40 and 80 ms at one every 2 and 4 ms, and 160 ms of
    // the worker's CPU time.
    let got = until(&rx2, |l| {
        fires(l).is_some_and(|(p, t, c)| p >= p0 + 20 && t >= t0 + 20 && c >= c0 + 20)
    });
    let l = got.last().unwrap();
    assert_eq!(field(l, "ptimer_bad"), Some(0), "{l}");
    assert!(l.ends_with("ptimer_ids=ok"), "{l}");
    end(&mut r);
}

/// An eventfd moves with its counter, semaphore mode and O_NONBLOCK.
#[test]
fn an_eventfd_keeps_its_counter() {
    let dir = Scratch::new("host_checkpoint_eventfd");
    let (mut child, _rx) = mkcounter_running("", "--mem 1M --interval-ms 5 --eventfd 42");
    let pid = child.id();
    let img = dir.join("eventfd.img");
    save_and_stop(pid, &img);
    let _ = child.wait();
    let mut r = restore_running(&img);
    let (_rx2, _err, _, new_pid) = restoring(&mut r);
    let fd = std::fs::read_dir(format!("/proc/{new_pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy() == "anon_inode:[eventfd]")
        })
        .expect("an eventfd in the restored process")
        .file_name();
    let info = std::fs::read_to_string(format!("/proc/{new_pid}/fdinfo/{}", fd.to_string_lossy()))
        .unwrap();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("eventfd-count:"), "2a", "{info}");
    assert_eq!(field("eventfd-semaphore:"), "1", "{info}");
    let flags = u32::from_str_radix(&field("flags:"), 8).unwrap();
    assert_ne!(flags & nix::libc::O_NONBLOCK as u32, 0, "{info}");
    end(&mut r);
}

/// The number after `name=` in a line.
fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))?
        .parse()
        .ok()
}

/// The restored process's descriptors on `target` (the `/proc` link), by
/// number, with their fdinfo.
fn fds_on(pid: u32, target: impl Fn(&str) -> bool) -> Vec<(u32, String, String)> {
    let mut v: Vec<(u32, String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let t = std::fs::read_link(e.path())
                .ok()?
                .to_string_lossy()
                .into_owned();
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            target(&t).then(|| {
                let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
                (fd, t, info)
            })
        })
        .collect();
    v.sort();
    v
}

/// The value after `name` in an fdinfo text.
fn info_field(info: &str, name: &str) -> String {
    info.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// A periodic timerfd moves with its clock, period, time left and unread
/// expirations: after a save, 1 s away and a restore, the expirations the
/// process reads keep up with the whole periods its CLOCK_MONOTONIC says
/// have passed since it armed the timer (the clock goes on from the freeze,
/// the timer from the time it had left), and a one-shot timer that expired
/// before the save and was never read still has its expiration to read.
#[test]
fn a_timerfd_fires_on_in_step_with_the_process_clock() {
    let dir = Scratch::new("host_checkpoint_timerfd");
    let (mut child, rx) = mkcounter_running("", "--mem 1M --interval-ms 40 --timerfd-ms 5");
    let pid = child.id();
    let mut last = until(&rx, |l| field(l, "timerfd_fires").is_some_and(|f| f >= 20))
        .pop()
        .unwrap();
    let img = dir.join("timerfd.img");
    save_and_stop(pid, &img);
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        if field(&l, "timerfd_fires").is_some() {
            last = l;
        }
    }
    let _ = child.wait();
    let before = field(&last, "timerfd_fires").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut r = restore_running(&img);
    let (rx2, _err, _, new_pid) = restoring(&mut r);
    let first = until(&rx2, |l| field(l, "timerfd_fires").is_some())
        .pop()
        .unwrap();
    assert_eq!(
        field(&first, "timerfd_oneshot"),
        Some(1),
        "the unread expiration of the one-shot timer was lost: {first}"
    );
    let got = until(&rx2, |l| {
        field(l, "timerfd_fires").is_some_and(|f| f >= before + 60)
    });
    for l in got.iter().filter(|l| field(l, "timerfd_fires").is_some()) {
        let (f, d) = (
            field(l, "timerfd_fires").unwrap(),
            field(l, "timerfd_due").unwrap(),
        );
        assert!(
            f + 2 >= d && f <= d + 1,
            "{f} expirations read where {d} periods passed (before the save: {last}): {l}"
        );
    }
    let timers = fds_on(new_pid, |t| t == "anon_inode:[timerfd]");
    assert_eq!(timers.len(), 2, "{timers:?}");
    let (_, _, periodic) = &timers[0];
    assert_eq!(info_field(periodic, "clockid:"), "1", "{periodic}");
    assert_eq!(
        info_field(periodic, "it_interval:"),
        "(0, 5000000)",
        "{periodic}"
    );
    let flags = u32::from_str_radix(&info_field(periodic, "flags:"), 8).unwrap();
    assert_ne!(flags & nix::libc::O_NONBLOCK as u32, 0, "{periodic}");
    assert_ne!(flags & nix::libc::O_CLOEXEC as u32, 0, "{periodic}");
    let (_, _, oneshot) = &timers[1];
    assert_eq!(info_field(oneshot, "clockid:"), "7", "{oneshot}");
    assert_eq!(info_field(oneshot, "it_value:"), "(0, 0)", "{oneshot}");
    end(&mut r);
}

/// A signalfd moves with its mask and O_NONBLOCK: SIGUSR2 (blocked in
/// every thread) sent to the restored process is read from it.
#[test]
fn a_signalfd_still_reads_its_signals() {
    let dir = Scratch::new("host_checkpoint_signalfd");
    let (mut child, rx) = mkcounter_running("", "--mem 1M --interval-ms 10 --signalfd");
    let pid = child.id();
    let usr2 = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .expect("SIGUSR2")
    };
    usr2(pid);
    until(&rx, |l| field(l, "sigusr2") == Some(1));
    let img = dir.join("signalfd.img");
    save_and_stop(pid, &img);
    let _ = child.wait();
    let mut r = restore_running(&img);
    let (rx2, _err, _, new_pid) = restoring(&mut r);
    until(&rx2, |l| field(l, "sigusr2") == Some(1));
    usr2(new_pid);
    until(&rx2, |l| field(l, "sigusr2") == Some(2));
    usr2(new_pid);
    until(&rx2, |l| field(l, "sigusr2") == Some(3));
    let sfd = fds_on(new_pid, |t| t == "anon_inode:[signalfd]");
    assert_eq!(sfd.len(), 1, "{sfd:?}");
    assert_eq!(
        info_field(&sfd[0].2, "sigmask:"),
        "0000000000000800",
        "{}",
        sfd[0].2
    );
    end(&mut r);
}

/// A pipe whose both ends are in the process moves with the bytes in it,
/// byte for byte; its ends are connected to each other again, a `dup` of
/// the read end still shares it, and a save that leaves the process
/// running (what a failed move does too) takes nothing out of the pipe.
#[test]
fn a_pipe_moves_with_its_bytes_in_flight() {
    let dir = Scratch::new("host_checkpoint_pipe");
    let (mut child, rx) = mkcounter_running("", "--mem 1M --interval-ms 10 --pipe-inflight 40001");
    let pid = child.id();
    let img = dir.join("pipe.img");
    // Saved, left running: the bytes are all still there, in order.
    let out = checkpoint(pid, false, &img);
    assert!(out.status.success(), "{out:?}");
    usr1(pid);
    let l = until(&rx, |l| l.starts_with("pipe_check=")).pop().unwrap();
    assert_eq!(l, "pipe_check=ok shared=1");
    until(&rx, |l| field(l, "pipe_bytes") == Some(40001));
    // Saved and stopped, restored: the process checks its pipe itself.
    save_and_stop(pid, &img);
    let _ = child.wait();
    let mut r = restore_running(&img);
    let (rx2, _err, _, new_pid) = restoring(&mut r);
    let got = until(&rx2, |l| l.starts_with("pipe_check="));
    assert_eq!(got.last().unwrap(), "pipe_check=ok shared=1", "{got:?}");
    until(&rx2, |l| field(l, "pipe_bytes") == Some(40001));
    let ends = fds_on(new_pid, |t| t.starts_with("pipe:["));
    let on_pipe: Vec<_> = ends.iter().filter(|(fd, _, _)| *fd > 2).collect();
    assert_eq!(on_pipe.len(), 3, "{ends:?}");
    assert!(
        on_pipe.iter().all(|(_, t, _)| *t == on_pipe[0].1),
        "{ends:?}"
    );
    // And once more from the copy: the restored pipe is a pipe like any.
    usr1(new_pid);
    let l = until(&rx2, |l| l.starts_with("pipe_check=")).pop().unwrap();
    assert_eq!(l, "pipe_check=ok shared=1");
    end(&mut r);
}

/// A pipe with an end in another process is refused by name (that
/// process is named), and the process runs on with its bytes.
#[test]
fn a_pipe_shared_with_another_process_is_refused_by_name() {
    let dir = Scratch::new("host_checkpoint_pipe_outside");
    // fd 5: the read end of a pipe whose write end `sleep` holds.
    let (mut child, rx) =
        mkcounter_running("exec 5< <(exec sleep 60);", "--mem 1M --interval-ms 5");
    let pid = child.id();
    let img = dir.join("never.img");
    let out = checkpoint(pid, true, &img);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    // The holder, named in the message, goes when the test does.
    let holder: Option<i32> = err
        .split("also open in process ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok());
    if let Some(h) = holder {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(h),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("fd 5 is a pipe (pipe:[") && holder.is_some(),
        "{err}"
    );
    assert!(!img.exists());
    let l = until(&rx, |l| seq(l).is_some());
    let s = seq(l.last().expect("line")).expect("seq");
    until(&rx, |l| seq(l).is_some_and(|x| x >= s + 10));
    let _ = child.kill();
    let _ = child.wait();
}

/// AF_UNIX socket pairs whose two ends are in the process move with what
/// is queued in them: a stream's 40001 bytes byte for byte, three datagrams
/// (1, 0 and 1000 bytes) one by one; the new ends are connected to each
/// other; a save that leaves the process running takes nothing out.
#[test]
fn socket_pairs_move_with_what_is_queued() {
    moves_and_checks(
        "host_checkpoint_socketpairs",
        "--mem 1M --interval-ms 10 --socketpairs 40001",
        "socket_check=",
        |pid, img| {
            // A save that leaves the process running takes nothing out.
            let out = checkpoint(pid, false, img);
            assert!(out.status.success(), "{out:?}");
        },
        |new_pid| {
            let socks = fds_on(new_pid, |t| t.starts_with("socket:["));
            assert_eq!(socks.len(), 4, "{socks:?}");
        },
    );
}

/// An epoll moves with its watches, on the descriptors the program knows
/// them by: a wait sees what it saw (through a dup of it too), a pipe's
/// write wakes it, and its watches can be changed by number afterwards.
#[test]
fn an_epoll_moves_with_its_watches() {
    moves_and_checks(
        "host_checkpoint_epoll",
        "--mem 1M --interval-ms 10 --epoll",
        "epoll_check=",
        |_, _| {},
        |new_pid| {
            let eps = fds_on(new_pid, |t| t == "anon_inode:[eventpoll]");
            assert_eq!(eps.len(), 2, "{eps:?}");
            // One instance behind both (the dup shares it), two watches.
            let tfds = |info: &str| -> Vec<String> {
                info.lines()
                    .filter(|l| l.starts_with("tfd:"))
                    .map(|l| l.split(" pos:").next().unwrap().to_string())
                    .collect()
            };
            assert_eq!(tfds(&eps[0].2).len(), 2, "{eps:?}");
            assert_eq!(tfds(&eps[0].2), tfds(&eps[1].2), "{eps:?}");
        },
    );
}

/// An epoll that watches a file through a descriptor since closed cannot
/// have that watch set again: refused, naming the descriptor; the process
/// runs on with its epoll intact.
#[test]
fn an_epoll_watching_a_closed_descriptor_is_refused_by_name() {
    let dir = Scratch::new("host_checkpoint_epoll_stale");
    let (mut child, rx) = mkcounter_running("", "--mem 1M --interval-ms 5 --epoll-stale");
    let pid = child.id();
    let img = dir.join("never.img");
    let out = checkpoint(pid, true, &img);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is an epoll watching a file that fd ") && err.contains("no longer holds"),
        "{err}"
    );
    assert!(!img.exists());
    usr1(pid);
    let l = until(&rx, |l| l.starts_with("epoll_check=")).pop().unwrap();
    assert_eq!(l, "epoll_check=ok");
    let _ = child.kill();
    let _ = child.wait();
}

/// Anonymous shared memory the process alone maps moves with it, every
/// page (one out of its page tables too), and is shared memory again: a
/// child forked after the restore writes into it and the parent sees it.
#[test]
fn anonymous_shared_memory_moves_and_stays_shared() {
    moves_and_checks(
        "host_checkpoint_shm",
        "--mem 1M --interval-ms 10 --shared-mem 3M",
        "shm_check=",
        |_, _| {},
        |new_pid| {
            let maps = std::fs::read_to_string(format!("/proc/{new_pid}/maps")).unwrap();
            assert!(
                maps.lines()
                    .any(|l| l.contains(" rw-s ") && l.ends_with("/dev/zero (deleted)")),
                "{maps}"
            );
        },
    );
}

/// A memfd on a descriptor and mapped shared moves through `mkctl
/// checkpoint` / `restore`: one memfd again (a write through the mapping
/// reads back through the descriptor), its marker past the mapping, size,
/// seals and offset as they were.
#[test]
fn a_memfd_moves_and_is_one_memfd_again() {
    moves_and_checks(
        "host_checkpoint_memfd",
        "--mem 1M --interval-ms 10 --memfd 2M",
        "memfd_check=",
        |_, _| {},
        |new_pid| {
            let maps = std::fs::read_to_string(format!("/proc/{new_pid}/maps")).unwrap();
            assert!(
                maps.lines().any(
                    |l| l.contains(" rw-s ") && l.ends_with("/memfd:mkcounter-memfd (deleted)")
                ),
                "{maps}"
            );
        },
    );
}

/// The shape of the descriptor and memory kinds' tests: a `mkcounter` with
/// `args` checks itself on SIGUSR1 (a line `<check>ok`), after `before`
/// (its pid, the image path); it is saved with `--kill` and restored, checks
/// itself again when it finds itself moved, `after` looks at the new pid,
/// and one more SIGUSR1 check ends it.
fn moves_and_checks(
    name: &str,
    args: &str,
    check: &str,
    before: impl FnOnce(u32, &std::path::Path),
    after: impl FnOnce(u32),
) {
    let dir = Scratch::new(name);
    let ok = format!("{check}ok");
    let (mut child, rx) = mkcounter_running("", args);
    let pid = child.id();
    let img = dir.join("moved.img");
    before(pid, &img);
    usr1(pid);
    let l = until(&rx, |l| l.starts_with(check)).pop().unwrap();
    assert_eq!(l, ok);
    save_and_stop(pid, &img);
    let _ = child.wait();
    let mut r = restore_running(&img);
    let (rx2, _err, _, new_pid) = restoring(&mut r);
    let got = until(&rx2, |l| l.starts_with(check));
    assert_eq!(got.last().unwrap(), &ok, "{got:?}");
    after(new_pid);
    usr1(new_pid);
    let l = until(&rx2, |l| l.starts_with(check)).pop().unwrap();
    assert_eq!(l, ok);
    end(&mut r);
}

/// On a terminal a long checkpoint draws its progress (bytes and rate) on
/// stderr, erased at the end; piped, it draws nothing.
#[test]
fn a_long_checkpoint_shows_its_progress_on_a_terminal_only() {
    let dir = Scratch::new("host_checkpoint_progress");
    let (mut child, _rx) = mkcounter_running("", "--mem 768M --interval-ms 50");
    let pid = child.id();
    let img = dir.join("big.img");
    // `script` gives the command a terminal; its output is what it drew.
    let inner = format!(
        "MKCTL_RUN_DIR=/nonexistent/mkctl-host-checkpoint {} checkpoint {pid} --on host -o {}",
        mkctl_bin().display(),
        img.display()
    );
    let out = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (bsdutils)");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    let drawn: Vec<&str> = tty
        .split('\r')
        .filter(|l| l.contains("mkctl: writing the image: "))
        .collect();
    assert!(!drawn.is_empty(), "no progress drawn: {tty:?}");
    assert!(drawn.iter().all(|l| l.contains("/s")), "{drawn:?}");
    assert!(tty.contains("wrote "), "{tty:?}");
    // Piped: the summary only.
    save_and_stop(pid, &img);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("writing the image") && !err.contains('\r'),
        "{err:?}"
    );
    let _ = child.wait();
}

/// A socket whose peer another process holds is refused, naming it; the
/// process runs on.
#[test]
fn a_socket_whose_peer_is_elsewhere_is_refused_by_name() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = Scratch::new("host_checkpoint_socket_outside");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(cache_dir().join("mkcounter"));
    cmd.args(["--mem", "1M", "--interval-ms", "5"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // Only that end on fd 5 (and stdio): whatever else the harness leaks
    // (other tests' pipes, cargo's jobserver) would be refused too.
    // SAFETY: dup2, close and close_range in the child between fork and
    // exec (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it then (the
            // end is fd 5 already when the harness holds fewer fds, e.g.
            // after cargo ran another test binary).
            let ok = if fd == 5 {
                nix::libc::fcntl(5, nix::libc::F_SETFD, 0) >= 0
            } else {
                nix::libc::dup2(fd, 5) >= 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            nix::libc::close(3);
            nix::libc::close(4);
            nix::libc::syscall(nix::libc::SYS_close_range, 6u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn mkcounter");
    drop(theirs);
    let rx = lines(child.stdout.take().unwrap());
    until(&rx, |l| seq(l).is_some_and(|s| s >= 5));
    let img = dir.join("never.img");
    let out = checkpoint(child.id(), true, &img);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let me = std::process::id();
    assert!(
        err.contains("fd 5 is a socket (socket:[")
            && err.contains(&format!("is open in process {me}")),
        "{err}"
    );
    assert!(!img.exists());
    let l = until(&rx, |l| seq(l).is_some());
    let s = seq(l.last().expect("line")).expect("seq");
    until(&rx, |l| seq(l).is_some_and(|x| x >= s + 10));
    drop(ours);
    let _ = child.kill();
    let _ = child.wait();
}

/// `kcmp(KCMP_FILE)` of two descriptors of process `pid`: 0 when they
/// share one open file description.
fn kcmp_file(pid: u32, a: i32, b: i32) -> i64 {
    // SAFETY: kcmp takes integers only.
    unsafe { nix::libc::syscall(nix::libc::SYS_kcmp, pid, pid, 0, a, b) }
}

/// Descriptors that share one open file description (a `dup`) share one
/// again after a restore (a write through one moves the other's offset);
/// two opens of the same file stay two.
#[test]
fn dup_descriptors_share_their_open_file_again() {
    let dir = Scratch::new("host_checkpoint_dups");
    let log = dir.join("dups.log");
    let (mut child, _rx) = mkcounter_running(
        &format!(
            "exec 3>{0}; exec 4>&3; exec 5<{0}; exec 6<{0};",
            log.display()
        ),
        "--mem 1M --interval-ms 10",
    );
    let pid = child.id();
    assert_eq!(kcmp_file(pid, 3, 4), 0);
    assert_ne!(kcmp_file(pid, 5, 6), 0);
    let img = dir.join("dups.img");
    save_and_stop(pid, &img);
    let _ = child.wait();
    let mut r = restore_running(&img);
    let (_rx2, _err, _, new_pid) = restoring(&mut r);
    assert_eq!(
        kcmp_file(new_pid, 3, 4),
        0,
        "fd 4 no longer shares fd 3's file"
    );
    assert_ne!(kcmp_file(new_pid, 5, 6), 0, "two opens became one");
    assert_ne!(kcmp_file(new_pid, 3, 5), 0);
    end(&mut r);
}

/// `mkctl checkpoint --tree` of mktree (a top, a kid, a zombie) and
/// `mkctl restore` of the tree image: the lines of both go on from the
/// next, mkctl says it restored a tree, and a SIGTERM to mkctl reaches
/// every process of it; the top's end is mkctl's status. Without
/// `--tree`, the checkpoint is refused and names the flag.
#[test]
fn a_tree_is_checkpointed_and_restored_by_mkctl() {
    let dir = Scratch::new("host_checkpoint_tree");
    let prog = mkctl_e2e::host_testprog("mktree");
    let mut c = Command::new("bash");
    c.arg("-c").arg(format!(
        "for f in /proc/$$/fd/*; do n=${{f##*/}}; [ \"$n\" -gt 2 ] && eval \"exec $n>&-\"; done 2>/dev/null; exec {} --interval-ms 10",
        prog.display()
    ));
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mktree");
    let pid = child.id();
    let rx = lines(child.stdout.take().expect("stdout"));
    let first = until(&rx, |l| l.starts_with("top n=3 "));
    let kid = first
        .iter()
        .find_map(|l| field(l, "kid"))
        .expect("the kid's pid") as i32;
    let refused = checkpoint(pid, true, &dir.join("alone.img"));
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--tree"),
        "{refused:?}"
    );

    let img = dir.join("tree.img");
    let out = checkpoint_with(pid, &["--tree", "--kill"], &img);
    assert!(out.status.success(), "{out:?}");
    // It says what it saved: the top, its kid and the zombie, all killed.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "of the tree of process {pid} (3 processes) on host"
        )) && said.trim_end().ends_with("; they were killed"),
        "{said}"
    );
    let mut last_top = 0;
    let mut last_kid = 0;
    for l in first
        .iter()
        .cloned()
        .chain(std::iter::from_fn(|| rx.recv_timeout(T).ok()))
    {
        if l.starts_with("top ") {
            last_top = field(&l, "n").expect("n");
        } else if l.starts_with("kid ") {
            last_kid = field(&l, "n").expect("n");
        }
    }
    let _ = child.wait();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(kid),
        nix::sys::signal::Signal::SIGKILL,
    );

    let mut r = restore_running(&img);
    let out = lines(r.stdout.take().expect("stdout"));
    let mut err = BufReader::new(r.stderr.take().expect("stderr"));
    let mut said = String::new();
    err.read_line(&mut said).expect("stderr line");
    assert!(
        said.contains("restored the tree of") && said.contains("its top is pid"),
        "{said}"
    );
    let got = until(&out, |l| l.starts_with("kid "));
    let top = got
        .iter()
        .find(|l| l.starts_with("top "))
        .cloned()
        .unwrap_or_else(|| {
            until(&out, |l| l.starts_with("top "))
                .pop()
                .expect("a top line")
        });
    assert_eq!(field(&top, "n"), Some(last_top + 1), "{top}");
    assert_eq!(field(&top, "pid"), Some(u64::from(pid)), "{top}");
    let k = got
        .iter()
        .find(|l| l.starts_with("kid "))
        .expect("a kid line");
    assert_eq!(field(k, "n"), Some(last_kid + 1), "{k}");
    terminated(&mut r, &mut err);
}
