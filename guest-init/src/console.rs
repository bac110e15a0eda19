//! Progress lines on the console: every line starts with `guest-init:` (and
//! the kernel uptime once `/proc` is mounted), so the host can grep the serial
//! log. One `write` per line keeps lines whole when kernel messages interleave.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd};

/// Writes one progress line to stderr (the console for PID 1).
pub fn say(args: std::fmt::Arguments<'_>) {
    let line = match uptime() {
        Some(t) => format!("guest-init: [{t:>8.3}] {args}\n"),
        None => format!("guest-init: {args}\n"),
    };
    // Nothing sensible is left to do when the console itself fails.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Where the agent's log (the `log` facade `mknode` writes to) goes in a
/// guest: the console, as `say!` lines tagged `mknode:`.
#[derive(Debug)]
pub struct ConsoleLog;

impl log::Log for ConsoleLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            say(format_args!("mknode: {}", r.args()));
        }
    }
    fn flush(&self) {}
}

/// Sends the `log` facade to the console (once; later calls do nothing).
pub fn install_log() {
    if log::set_logger(&ConsoleLog).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// `say!("...", args)`: a progress line on the console.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { $crate::console::say(format_args!($($t)*)) };
}

/// Seconds since boot, from `/proc/uptime` (absent before `/proc` is mounted).
pub fn uptime() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Makes sure fds 0, 1 and 2 are open. The kernel opens `/dev/console` for
/// PID 1 only if the initramfs holds that node; when it did not, this opens it
/// from the devtmpfs mounted on `/dev`. Call it after the mounts (it looks at
/// `/proc/self/fd`).
pub fn ensure_stdio() {
    let open = |fd: i32| std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists();
    if (0..3).all(open) {
        return;
    }
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    let dups = [
        nix::unistd::dup2_stdin,
        nix::unistd::dup2_stdout,
        nix::unistd::dup2_stderr,
    ];
    for (fd, dup) in (0..3).zip(dups) {
        if fd != console.as_raw_fd() && !open(fd) {
            let _ = dup(&console);
        }
    }
    // The open itself may have landed on one of 0..=2: keep it open then.
    if console.as_raw_fd() < 3 {
        let _ = console.into_raw_fd();
    }
}
