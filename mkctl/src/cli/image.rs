//! `checkpoint` and `restore`: a process's image to a file (or stdout)
//! and back. On the host mkctl does the work itself — freeze, write, or
//! restore as its own child — with no daemon; on an instance the daemon
//! relays the image between this command and that kernel's agent.
//!
//! An image file is written through `FILE.partial`, renamed once whole, so
//! a failed checkpoint leaves no file that looks complete; an image to
//! restore is checked to begin like one before anything starts.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;

use mknode::wire::{Msg, MAX_CHUNK};

use super::live::{connect, is_host, refused, relay_output, started};
use super::progress::{self, Progress};
use super::{Failure, Res, EXIT_OK};
use crate::daemon::control::{Frame, Reply, Request};
use crate::units::ByteSize;

/// Writes `path` through a `.partial` file renamed into place once whole.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<(), Failure>,
) -> Result<u64, Failure> {
    if path.is_dir() {
        return Err(Failure::Usage(format!(
            "{} is a directory; give a file name",
            path.display()
        )));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let file = std::fs::File::create(&tmp).map_err(|e| {
        Failure::Failed(format!(
            "cannot write {} (through {}): {e}",
            path.display(),
            tmp.display()
        ))
    })?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |what: &str, e: std::io::Error| {
        Failure::Failed(format!("cannot {what} {}: {e}", tmp.display()))
    };
    let done = fill(&mut w).and_then(|()| {
        let f = w.into_inner().map_err(|e| io("write", e.into_error()))?;
        f.sync_all().map_err(|e| io("sync", e))?;
        let len = f.metadata().map_err(|e| io("stat", e))?.len();
        std::fs::rename(&tmp, path).map_err(|e| {
            Failure::Failed(format!(
                "cannot rename {} to {}: {e}",
                tmp.display(),
                path.display()
            ))
        })?;
        Ok(len)
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// `-` as an image path: stdout for checkpoint, stdin for restore.
fn is_stdio(path: &Path) -> bool {
    path == Path::new("-")
}

/// Why `-` cannot be used here, if it cannot: an image is binary, and a
/// terminal is no place to write or type one. Checked before anything is
/// frozen or started.
fn stdio_refusal(path: &Path, reading: bool) -> Option<Failure> {
    if !is_stdio(path) {
        return None;
    }
    if reading && std::io::stdin().is_terminal() {
        return Some(Failure::Usage(
            "restore - reads the image from stdin, which is a terminal: pipe an image in (mkctl checkpoint ... -o - | mkctl restore - ...) or give a file"
                .into(),
        ));
    }
    if !reading && std::io::stdout().is_terminal() {
        return Some(Failure::Usage(
            "-o - writes the image to stdout, which is a terminal: redirect it or give a file name"
                .into(),
        ));
    }
    None
}

/// Writes an image to `path` (through a `.partial` file, see
/// [`write_atomically`]) or, for `-`, to stdout; returns its size. On a
/// terminal, its progress is drawn meanwhile.
fn write_image_out(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), Failure>,
) -> Result<u64, Failure> {
    let progress = Progress::new("writing the image");
    if !is_stdio(path) {
        return write_atomically(path, |w| fill(&mut progress::Writer { inner: w, progress }));
    }
    let mut out = progress::Writer {
        inner: std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock()),
        progress,
    };
    fill(&mut out)?;
    out.flush()
        .map_err(|e| Failure::Failed(format!("cannot write the image to stdout: {e}")))?;
    Ok(out.progress.bytes())
}

/// What `checkpoint` was asked for, beside the pid, kernel and file.
#[derive(Clone, Copy)]
pub(super) struct Asked {
    pub(super) kill: bool,
    pub(super) tree: bool,
    pub(super) json: bool,
}

/// What a checkpoint wrote, for its summary.
struct Written {
    bytes: u64,
    /// A tree image's process count, from its header.
    processes: Option<usize>,
    took: std::time::Duration,
    /// How long the process (tree) stayed frozen; known on the host only.
    frozen: Option<std::time::Duration>,
}

/// Keeps the first bytes written through it (a tree image's header, to
/// count its processes), passing every byte on.
struct Head<'a> {
    inner: &'a mut dyn Write,
    head: Vec<u8>,
}

impl Write for Head<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let room = HEAD_KEPT.saturating_sub(self.head.len());
        self.head.extend_from_slice(&buf[..n.min(room)]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// More than the largest tree header.
const HEAD_KEPT: usize = 64 << 10;

/// The number of processes a tree image's header lists (`None` for a
/// process image, or a head that does not parse).
fn processes_in(head: &[u8]) -> Option<usize> {
    mknode::migrate::TreeMeta::read(&mut &head[..])
        .ok()
        .map(|m| m.procs.len())
}

/// What a checkpoint that worked prints: on stdout, or on stderr when the
/// image itself went to stdout (as JSON with `--json`).
fn say_written(output: &Path, pid: u32, on: &str, asked: Asked, w: &Written) -> Res {
    let to_stdout = is_stdio(output);
    let line = if asked.json {
        serde_json::to_string(&serde_json::json!({
            "pid": pid,
            "on": on,
            "image": output.to_string_lossy(),
            "bytes": w.bytes,
            "tree": asked.tree,
            "processes": w.processes.unwrap_or(1),
            "killed": asked.kill,
            "seconds": w.took.as_secs_f64(),
            "frozen_seconds": w.frozen.map(|d| d.as_secs_f64()),
        }))?
    } else {
        let what = match w.processes {
            Some(n) => format!("the tree of process {pid} ({n} processes)"),
            None => format!("process {pid}"),
        };
        let size = ByteSize(w.bytes).human();
        let head = if to_stdout {
            format!("wrote the image of {what} on {on} to stdout ({size})")
        } else {
            format!("wrote {} ({size}) of {what} on {on}", output.display())
        };
        let frozen = w
            .frozen
            .map(|d| format!(", frozen {:.3} s", d.as_secs_f64()))
            .unwrap_or_default();
        let end = match (asked.kill, asked.tree) {
            (false, _) => "; it runs on",
            (true, false) => "; it was killed",
            (true, true) => "; they were killed",
        };
        let line = format!("{head} in {:.3} s{frozen}{end}", w.took.as_secs_f64());
        if to_stdout {
            format!("mkctl: {line}")
        } else {
            line
        }
    };
    if to_stdout {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    Ok(EXIT_OK)
}

/// The image to restore: a file, or stdin for `-`, checked to begin like a
/// process image before anything is started. Exit code 2 when it cannot be
/// opened or is not an image.
fn open_image(file: &Path) -> Result<Box<dyn Read + Send>, Failure> {
    if let Some(why) = stdio_refusal(file, true) {
        return Err(why);
    }
    if file.is_dir() {
        return Err(Failure::Usage(format!(
            "{} is a directory; give an image file",
            file.display()
        )));
    }
    let mut r: Box<dyn Read + Send> = if is_stdio(file) {
        Box::new(std::io::stdin())
    } else {
        match std::fs::File::open(file) {
            Ok(f) => Box::new(f),
            Err(e) => {
                return Err(Failure::Usage(format!(
                    "cannot open {}: {}",
                    file.display(),
                    mknode::io_error_text(&e)
                )))
            }
        }
    };
    let magic = &mknode::migrate::image::MAGIC;
    let mut head = Vec::with_capacity(magic.len());
    if let Err(e) = (&mut r).take(magic.len() as u64).read_to_end(&mut head) {
        return Err(Failure::Usage(format!(
            "cannot read {}: {}",
            image_name(file),
            mknode::io_error_text(&e)
        )));
    }
    if head.is_empty() {
        let why = if is_stdio(file) {
            "nothing came on stdin (did the checkpoint before the pipe fail?)".to_string()
        } else {
            format!("{} is empty", file.display())
        };
        return Err(Failure::Usage(why));
    }
    if head != magic[..] && head != mknode::migrate::TREE_MAGIC[..] {
        return Err(Failure::Usage(format!(
            "{} is not a process image (it begins with {:?}, not {:?} or {:?})",
            image_name(file),
            String::from_utf8_lossy(&head),
            String::from_utf8_lossy(magic),
            String::from_utf8_lossy(&mknode::migrate::TREE_MAGIC)
        )));
    }
    Ok(Box::new(std::io::Cursor::new(head).chain(r)))
}

/// Checkpoint of a host process, done here: freeze, write, then let it go
/// on (or kill it). Any failure leaves it running untouched.
fn checkpoint_here(pid: u32, output: &Path, asked: Asked) -> Res {
    let start = std::time::Instant::now();
    let pid_i =
        i32::try_from(pid).map_err(|_| Failure::Usage(format!("pid {pid} out of range")))?;
    let frozen = mknode::migrate::freeze_any(pid_i, asked.tree)?;
    let mut head = Vec::new();
    let written = write_image_out(output, |w| {
        let mut w = Head {
            inner: w,
            head: Vec::new(),
        };
        let r = frozen
            .write_image(&mut w, mknode::migrate::ImageOptions::default())
            .map(|_| ())
            .map_err(|e| Failure::Failed(crate::error_chain(&e)));
        head = w.head;
        r
    });
    match written {
        Ok(bytes) => {
            let frozen_at = frozen.frozen_at();
            if asked.kill {
                frozen.kill();
            } else {
                frozen.resume();
            }
            let w = Written {
                bytes,
                processes: processes_in(&head),
                took: start.elapsed(),
                frozen: Some(frozen_at.elapsed()),
            };
            say_written(output, pid, "host", asked, &w)
        }
        Err(e) => {
            drop(frozen);
            let what = if asked.tree {
                "its tree runs"
            } else {
                "the process runs"
            };
            Err(Failure::Failed(format!("checkpoint of {pid}: {e}; {what} on")).into())
        }
    }
}

/// Restore on the host, done here: the process becomes this mkctl's child
/// with its stdin/stdout/stderr, and its exit status becomes mkctl's.
fn restore_here(file: &Path) -> Res {
    use std::os::fd::AsFd;
    let image = open_image(file)?;
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
    // With the image on stdin, the process gets /dev/null there: what
    // follows the image in the pipe is not its input.
    let stdin = if is_stdio(file) {
        std::fs::File::open("/dev/null")?.into()
    } else {
        dup(std::io::stdin().as_fd())?
    };
    let stdio = mknode::migrate::StdioPlan {
        stdin,
        stdout: dup(std::io::stdout().as_fd())?,
        stderr: dup(std::io::stderr().as_fd())?,
    };
    let image = progress::Reader {
        inner: image,
        progress: Progress::new("reading the image"),
    };
    let restored = match mknode::migrate::restore_any(
        std::io::BufReader::with_capacity(1 << 20, image),
        stdio,
    ) {
        Ok(r) => r,
        Err(e) => {
            return Err(Failure::Failed(format!(
                "restore of {}: {}",
                image_name(file),
                crate::error_chain(&e)
            ))
            .into())
        }
    };
    if restored.reap == restored.pid {
        eprintln!(
            "mkctl: restored {} on host as pid {}",
            image_name(file),
            restored.pid
        );
    } else {
        eprintln!(
            "mkctl: restored the tree of {} on host: its top is pid {}, in a pid namespace held by pid {}",
            image_name(file),
            restored.pid,
            restored.reap
        );
    }
    use nix::sys::wait::{waitpid, WaitStatus};
    // Signals go to the process; a tree's to every process of it, as a
    // terminal's to a foreground job. The status is the child's (a tree's
    // holder exits with its top's, once the tree is gone).
    let pid = nix::unistd::Pid::from_raw(restored.reap);
    forward_signals_until_exit(pid, restored.reap != restored.pid);
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Failure::Failed(format!("waiting for {pid}: {e}")).into()),
        }
    }
}

/// Passes SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to mkctl on to `child`
/// (as `mkctl exec` does to a remote command) until it has exited; for a
/// tree's holder (`tree`), on to every process below it (the holder, pid 1
/// of their namespace, takes none).
/// mkctl blocks them and reads them from a signalfd; the child is not
/// affected (its signal mask came from its image).
fn forward_signals_until_exit(child: nix::unistd::Pid, tree: bool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsFd;
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    let Ok(pidfd) = mknode::migrate::pidfd_open(child) else {
        return;
    };
    if set.thread_block().is_err() {
        return;
    }
    let Ok(sfd) = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) else {
        return;
    };
    loop {
        let mut fds = [
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        while let Ok(Some(info)) = sfd.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            let to: Vec<i32> = if tree {
                mknode::migrate::tree_of(child.as_raw())
                    .unwrap_or_default()
                    .into_iter()
                    .skip(1)
                    .collect()
            } else {
                vec![child.as_raw()]
            };
            for p in to {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
            }
        }
    }
}

pub(super) fn checkpoint(pid: u32, on: &str, output: &Path, asked: Asked) -> Res {
    if let Some(why) = stdio_refusal(output, false) {
        return Err(why.into());
    }
    if is_host(on) {
        return checkpoint_here(pid, output, asked);
    }
    let start = std::time::Instant::now();
    let mut c = connect()?;
    let failed = |e: &dyn std::error::Error| Failure::Failed(crate::error_chain(e));
    let mut head = Vec::new();
    // The request goes out once the file is there to take the image.
    let written = write_image_out(output, |w| {
        c.send(&Request::Checkpoint {
            pid,
            on: on.to_string(),
            kill: asked.kill,
            tree: asked.tree,
        })
        .map_err(|e| failed(&e))?;
        let mut w = Head {
            inner: w,
            head: Vec::new(),
        };
        let r = loop {
            match c.read().map_err(|e| failed(&e))? {
                Frame::Wire(Msg::ImageChunk { bytes, .. }) => {
                    w.write_all(&bytes).map_err(|e| failed(&e))?
                }
                Frame::Reply(Reply::Ok { .. }) => break Ok(()),
                Frame::Reply(r) => break Err(refused(r)),
                _ => {}
            }
        };
        head = w.head;
        r
    });
    match written {
        Ok(bytes) => {
            let w = Written {
                bytes,
                processes: processes_in(&head),
                took: start.elapsed(),
                frozen: None,
            };
            say_written(output, pid, on, asked, &w)
        }
        // The daemon's exit code stays (2: no such instance).
        Err(Failure::Daemon { message, code }) => Err(Failure::Daemon {
            message: format!("checkpoint of {pid} on {on}: {message}"),
            code,
        }
        .into()),
        Err(e) => Err(Failure::Failed(format!("checkpoint of {pid} on {on}: {e}")).into()),
    }
}

pub(super) fn restore(file: &Path, on: &str) -> Res {
    if is_host(on) {
        return restore_here(file);
    }
    let mut image = progress::Reader {
        inner: open_image(file)?,
        progress: Progress::new("sending the image"),
    };
    let mut c = connect()?;
    started(&mut c, &Request::Restore { on: on.to_string() })?;
    let mut w = c.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let n = image.read(&mut buf).unwrap_or_default();
            let m = Msg::ImageChunk {
                req: 0,
                bytes: buf[..n].to_vec(),
            };
            if w.send_wire(&m).is_err() || n == 0 {
                return;
            }
        }
    });
    relay_output(&mut c, on, Some(Path::new(&image_name(file))))
}

/// How messages name an image path: `-` is stdin.
fn image_name(file: &Path) -> String {
    if is_stdio(file) {
        "the image from stdin".into()
    } else {
        file.display().to_string()
    }
}
