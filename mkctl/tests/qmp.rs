//! The QMP client against a real QEMU (paused before the firmware runs, so
//! no kernel is needed): greeting, capabilities, vCPU thread ids, quit.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use mkctl::daemon::qmp::Qmp;

fn qemu() -> PathBuf {
    common::require_tool(
        &[PathBuf::from("/usr/bin/qemu-system-x86_64")],
        "qemu-system-x86_64 (Debian package qemu-system-x86)",
    )
}

#[test]
fn vcpu_threads_status_and_quit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(qemu())
        .args([
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "3", "-m", "64",
        ])
        .args(["-S", "-display", "none", "-nodefaults", "-no-user-config"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut q = Qmp::connect(&sock, Duration::from_secs(20)).unwrap();
    assert_eq!(q.status().unwrap(), "prelaunch");
    let threads = q.vcpu_threads().unwrap();
    assert_eq!(
        threads.iter().map(|t| t.cpu_index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    // Each vCPU runs on its own host thread of the QEMU process (MTTCG),
    // which is what the daemon pins.
    for t in &threads {
        let task = format!("/proc/{}/task/{}", child.id(), t.thread_id);
        assert!(std::path::Path::new(&task).exists(), "{task} missing");
    }
    let err = q.execute("no-such-command", None).unwrap_err().to_string();
    assert!(err.contains("CommandNotFound"), "{err}");
    q.quit().unwrap();
    let status = child.wait_timeout_or_kill(Duration::from_secs(10));
    assert!(status.success(), "qemu exit: {status:?}");
}

/// A frozen QEMU (SIGSTOP) accepts the connection and never greets: the
/// client gives up after the answer timeout it was given, which is what lets
/// a stop kill a frozen guest on time.
#[test]
fn a_frozen_qemu_is_given_up_on_after_the_answer_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(qemu())
        .args(["-machine", "q35", "-accel", "tcg", "-m", "64"])
        .args(["-S", "-display", "none", "-nodefaults", "-no-user-config"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Up and answering first, then frozen.
    drop(Qmp::connect(&sock, Duration::from_secs(20)).unwrap());
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t = std::time::Instant::now();
    let r = Qmp::connect_within(&sock, Duration::from_secs(1), Duration::from_secs(1));
    let took = t.elapsed();
    let _ = child.kill();
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    let _ = child.wait();
    assert!(r.is_err(), "a frozen QEMU greeted");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "gave up after {took:?}"
    );
}

trait WaitTimeout {
    fn wait_timeout_or_kill(&mut self, t: Duration) -> std::process::ExitStatus;
}

impl WaitTimeout for std::process::Child {
    fn wait_timeout_or_kill(&mut self, t: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + t;
        loop {
            if let Some(s) = self.try_wait().unwrap() {
                return s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.kill();
                return self.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
