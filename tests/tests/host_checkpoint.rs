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

/// `mkctl checkpoint <pid> --on host [--kill] -o <img>`.
fn checkpoint(pid: u32, kill: bool, img: &std::path::Path) -> std::process::Output {
    let mut c = mkctl();
    c.args(["checkpoint", &pid.to_string(), "--on", "host", "-o"])
        .arg(img);
    if kill {
        c.arg("--kill");
    }
    c.output().expect("mkctl checkpoint")
}

#[test]
fn checkpoint_and_restore_on_the_host() {
    let dir = Scratch::new("host_checkpoint");
    let (mut child, rx) = mkcounter_running("", "--mem 8M --interval-ms 5");
    let pid = child.id();
    let sum = checksum(&rx, pid);

    // A checkpoint that lets the process go on.
    let first = dir.join("running.img");
    let out = checkpoint(pid, false, &first);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote"));
    assert!(first.is_file());
    let after = until(&rx, |l| seq(l).is_some());
    let s1 = after.iter().filter_map(|l| seq(l)).next().expect("seq");
    let seen = until(&rx, |l| seq(l).is_some_and(|s| s >= s1 + 10));
    let mut last = seen.iter().filter_map(|l| seq(l)).next_back().expect("seq");

    // A checkpoint that stops it: its output ends.
    let img = dir.join("stopped.img");
    let out = checkpoint(pid, true, &img);
    assert!(out.status.success(), "{out:?}");
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
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM to mkctl restore");
    let mut rest = String::new();
    let _ = err.read_to_string(&mut rest);
    let status = r.wait().expect("mkctl restore ends");
    assert_eq!(status.code(), Some(128 + 15), "{rest}");
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
    let out = checkpoint(pid, true, &img);
    assert!(out.status.success(), "{out:?}");
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
    let out = checkpoint(pid, true, &img);
    assert!(out.status.success(), "{out:?}");
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
    let (mut child, rx) = mkcounter_running("", "--mem 1M --interval-ms 5 --alarm-ms 20");
    let pid = child.id();
    let mut last = until(&rx, |l| alarms(l).is_some_and(|a| a > 0))
        .iter()
        .find_map(|l| alarms(l));
    let img = dir.join("itimer.img");
    let out = checkpoint(pid, true, &img);
    assert!(out.status.success(), "{out:?}");
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        last = alarms(&l).or(last);
    }
    let _ = child.wait();
    let before = last.expect("an alarms= line before the checkpoint");
    assert!(before > 0, "the timer never fired before the checkpoint");
    let mut r = restore_running(&img);
    let (rx2, _err, _, _) = restoring(&mut r);
    // 20 more alarms: 400 ms at one every 20 ms.
    until(&rx2, |l| alarms(l).is_some_and(|a| a >= before + 20));
    end(&mut r);
}

/// An eventfd moves with its counter, semaphore mode and O_NONBLOCK.
#[test]
fn an_eventfd_keeps_its_counter() {
    let dir = Scratch::new("host_checkpoint_eventfd");
    let (mut child, _rx) = mkcounter_running("", "--mem 1M --interval-ms 5 --eventfd 42");
    let pid = child.id();
    let img = dir.join("eventfd.img");
    let out = checkpoint(pid, true, &img);
    assert!(out.status.success(), "{out:?}");
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
