//! Progress of a long image transfer, for people: on a terminal, one stderr
//! line redrawn at most five times a second with the bytes so far and the
//! rate (`mkctl: writing the image: 212.4M, 180.2M/s`), erased when the
//! transfer ends (the command's own summary follows). When stderr is not a
//! terminal nothing is drawn: scripts and logs see only the command's
//! lines.

use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use crate::units::ByteSize;

/// How often the line is redrawn, and how long a transfer runs before it
/// is drawn at all.
const EVERY: Duration = Duration::from_millis(200);

/// Counts bytes and draws them.
pub(super) struct Progress {
    what: &'static str,
    bytes: u64,
    start: Instant,
    next: Instant,
    tty: bool,
    drawn: bool,
}

impl Progress {
    /// For a transfer that `what` names (`"writing the image"`).
    pub(super) fn new(what: &'static str) -> Progress {
        let start = Instant::now();
        Progress {
            what,
            bytes: 0,
            start,
            next: start + EVERY,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// Bytes so far.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// `n` more bytes went through.
    pub(super) fn add(&mut self, n: usize) {
        self.set(self.bytes + n as u64);
    }

    /// `bytes` went through so far (told by the daemon, for a move).
    pub(super) fn set(&mut self, bytes: u64) {
        self.bytes = bytes;
        if !self.tty {
            return;
        }
        let now = Instant::now();
        if now >= self.next {
            self.next = now + EVERY;
            eprint!("\r\x1b[K{}", line(self.what, self.bytes, now - self.start));
            let _ = std::io::stderr().flush();
            self.drawn = true;
        }
    }
}

impl Progress {
    /// Erases the line (another line is about to be printed); the next
    /// count draws it again.
    pub(super) fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[K");
            let _ = std::io::stderr().flush();
            self.drawn = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The progress line: what, bytes so far, mean rate since the start.
fn line(what: &str, bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    // A rate is an estimate: precision loss is fine.
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let rate = (bytes as f64 / secs) as u64;
    format!(
        "mkctl: {what}: {}, {}/s",
        ByteSize(bytes).human(),
        ByteSize(rate).human()
    )
}

/// A writer that counts (and draws) what goes through to `inner`.
pub(super) struct Writer<W> {
    pub(super) inner: W,
    pub(super) progress: Progress,
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.progress.add(n);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that counts (and draws) what comes from `inner`.
pub(super) struct Reader<R> {
    pub(super) inner: R,
    pub(super) progress: Progress,
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(b)?;
        self.progress.add(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_bytes_and_rate() {
        assert_eq!(
            line("writing the image", 300 << 20, Duration::from_secs(2)),
            "mkctl: writing the image: 300M, 150M/s"
        );
        assert_eq!(
            line("reading the image", 1536, Duration::from_millis(500)),
            "mkctl: reading the image: 1.5K, 3K/s"
        );
        // No division by zero at the very start.
        assert!(line("x", 10, Duration::ZERO).ends_with("/s"));
    }

    #[test]
    fn counts_what_goes_through_and_draws_nothing_off_a_terminal() {
        let mut w = Writer {
            inner: Vec::new(),
            progress: Progress::new("writing"),
        };
        w.progress.tty = false;
        w.write_all(&[7u8; 5000]).unwrap();
        assert_eq!(w.progress.bytes(), 5000);
        assert!(!w.progress.drawn);
        let mut r = Reader {
            inner: &w.inner[..],
            progress: Progress::new("reading"),
        };
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!((out.len(), r.progress.bytes()), (5000, 5000));
    }
}
