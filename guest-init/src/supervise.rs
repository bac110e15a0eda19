//! PID 1's duties once the guest is up: reap every orphan that is re-parented
//! to it, and turn the usual "please stop" signals into a clean power-off.
//!
//! Signals are blocked in every thread ([`block_signals`], called first thing
//! in `main`, before any thread exists) and taken synchronously with
//! `sigwait`, so nothing runs in a signal handler.
//!
//! The agent will run its own loop and keep exit statuses of the processes it
//! starts; it will then reap only pids it does not know. Until then
//! [`idle`] reaps everything.

use nix::errno::Errno;
use nix::sys::reboot::set_cad_enabled;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::say;

/// The signals PID 1 waits for.
pub fn signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Blocks [`signals`] in the calling thread (and every thread it starts later)
/// and routes Ctrl-Alt-Del to SIGINT instead of an immediate reboot.
pub fn block_signals() -> nix::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals()), None)?;
    set_cad_enabled(false)
}

/// Reaps every exited child without blocking; returns how many.
pub fn reap_all() -> usize {
    let mut n = 0;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return n,
            Ok(_) => n += 1,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                say!("waitpid: {e}");
                return n;
            }
        }
    }
}

/// Waits for signals forever: SIGCHLD reaps, SIGTERM / SIGINT (Ctrl-Alt-Del)
/// / SIGPWR / SIGUSR2 return so the caller powers off.
pub fn idle() -> Signal {
    let set = signals();
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                reap_all();
            }
            Ok(sig) => return sig,
            Err(e) => {
                say!("sigwait: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}
