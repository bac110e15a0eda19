//! The daemon's handle on one instance's QEMU: a child it spawned, or a
//! process an earlier daemon spawned and this one adopted
//! ([`super::saved`]). Either way the daemon can ask whether it exited,
//! kill it and wait for it; only a child's exit status is known (an
//! adopted QEMU's parent is now init, which reaps it).
//!
//! An adopted QEMU is held by a pidfd (`pidfd_open(2)`, Linux 5.3), taken
//! only after its start time was checked against the one saved, so a pid
//! reused by another process is never signalled: the pidfd names that one
//! process for as long as it is held.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Child;
use std::time::{Duration, Instant};

/// An instance's QEMU.
#[derive(Debug)]
pub struct Qemu {
    pid: u32,
    /// Its start time ([`start_time`]), saved so a later daemon can tell
    /// it from another process that reuses its pid.
    start: Option<u64>,
    held: Held,
}

#[derive(Debug)]
enum Held {
    /// Spawned by this daemon.
    Child(Child),
    /// Spawned by an earlier daemon of this run directory: its pidfd.
    Adopted(OwnedFd),
}

impl Qemu {
    /// A QEMU this daemon just spawned.
    pub fn spawned(child: Child) -> Qemu {
        let pid = child.id();
        Qemu {
            pid,
            start: start_time(pid),
            held: Held::Child(child),
        }
    }

    /// Takes `pid` when it still runs with start time `start` (saved when
    /// it was spawned); `None` when it exited, or the pid now belongs to
    /// another process.
    pub fn adopt(pid: u32, start: u64) -> Option<Qemu> {
        if start_time(pid) != Some(start) {
            return None;
        }
        let raw = i32::try_from(pid).ok()?;
        // SAFETY: pidfd_open takes a pid and flags by value and returns a
        // new descriptor or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: `fd` was just returned by pidfd_open and nothing else
        // owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Checked again now that it is held: the pid could have been
        // reused between the first check and the open.
        (start_time(pid) == Some(start)).then_some(Qemu {
            pid,
            start: Some(start),
            held: Held::Adopted(pidfd),
        })
    }

    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Its start time, when it could be read at spawn.
    pub fn start(&self) -> Option<u64> {
        self.start
    }

    /// How long it has run, from its start time and the system's uptime.
    pub fn age(&self) -> Option<Duration> {
        let ticks = self.start?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
        let up = std::fs::read_to_string("/proc/uptime").ok()?;
        let up: f64 = up.split_whitespace().next()?.parse().ok()?;
        Some(
            Duration::from_secs_f64(up)
                .saturating_sub(Duration::from_millis(ticks.saturating_mul(1000) / hz)),
        )
    }

    /// Whether this daemon adopted it (rather than spawned it).
    pub fn adopted(&self) -> bool {
        matches!(self.held, Held::Adopted(_))
    }

    /// `Some(how it ended)` once it exited, without waiting.
    pub fn try_wait(&mut self) -> Option<String> {
        match &mut self.held {
            Held::Child(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            Held::Adopted(fd) => pidfd_exited(fd, Duration::ZERO)
                .then(|| "exit status unknown: an earlier daemon started it".to_string()),
        }
    }

    /// Kills it and waits until it is gone (an adopted one at most 5 s:
    /// init reaps it).
    pub fn kill(&mut self) {
        match &mut self.held {
            Held::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Held::Adopted(fd) => {
                // SAFETY: a signal sent through a pidfd this struct owns;
                // the siginfo pointer may be null; no memory is passed.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                while !pidfd_exited(fd, Duration::from_millis(50)) && Instant::now() < deadline {}
            }
        }
    }
}

/// The start time of `pid` (`/proc/<pid>/stat` field 22, clock ticks since
/// boot): with the pid, it names one process for the machine's uptime.
/// `None` when it is gone or a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The start time in one `/proc/<pid>/stat` line; `None` for a zombie.
fn stat_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); field 22 is the 20th from there.
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// True once the process of `pidfd` exited (the pidfd polls readable),
/// waiting at most `wait`.
fn pidfd_exited(pidfd: &OwnedFd, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, and its count is 1.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> Child {
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap()
    }

    /// An adopted process is seen running, is killed through its pidfd and
    /// is seen gone; a wrong start time (a reused pid) is never taken.
    #[test]
    fn adopted_process_is_watched_and_killed_and_a_reused_pid_is_refused() {
        let mut child = sleeper();
        let pid = child.id();
        let started = start_time(pid).expect("start time of a running child");
        assert!(Qemu::adopt(pid, started + 1).is_none(), "wrong start time");
        let mut q = Qemu::adopt(pid, started).expect("adopt");
        assert_eq!((q.id(), q.start(), q.adopted()), (pid, Some(started), true));
        let age = q.age().unwrap();
        assert!(age < Duration::from_secs(5), "{age:?}");
        assert_eq!(q.try_wait(), None);
        // Reaped by its real parent (this test) meanwhile, as init would.
        let reaper = std::thread::spawn(move || child.wait().unwrap());
        q.kill();
        let status = reaper.join().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(q.try_wait().is_some());
        assert!(Qemu::adopt(pid, started).is_none(), "gone");
    }

    #[test]
    fn start_time_parses_a_name_with_spaces_and_parentheses() {
        let fields: String = (4..=21).map(|f| format!(" {f}")).collect();
        let line = format!("77 (qemu (x) y) S{fields} 987654 23 24\n");
        assert_eq!(stat_start_time(&line), Some(987_654));
        let zombie = line.replace(") S ", ") Z ");
        assert_eq!(stat_start_time(&zombie), None);
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX - 1).is_none());
    }
}
