//! Moving a process between kernels over agent links: the protocol around
//! `migrate`'s capture and restore.
//!
//! Origin: freeze the process, stream its image to the destination in
//! `MigrateChunk`s, wait for `MigrateRunning`; then kill the frozen
//! original, or — on any failure before that — let it go on untouched.
//! Destination: restore from the stream with pipes for stdout/stderr, say
//! `MigrateRunning`, and carry the process's output and exit status back to
//! the origin, which writes the bytes to the original's own descriptors
//! (opened through `/proc/<pid>/fd` before it was killed) and reports the
//! status where the original's would have gone. A process moved several
//! times forwards through each hop, so its first stream never sees a gap.
//!
//! Checkpoint and restore through a file use the same pieces: the image
//! goes to the requester in `ImageChunk`s, or comes from it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::agent::Agent;
use crate::migrate::{self, ImageOptions, StdioPlan};
use crate::wire::{ExitStatus, Msg, Stream, MAX_CHUNK};

/// How long the origin waits for the destination to say "running" after
/// the whole image went out, and how long a destination waits for the next
/// piece of an image.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);

enum Piece {
    Bytes(Vec<u8>),
    End,
    Abort,
}

enum Ctl {
    Running(u32),
    Failed(String),
}

/// The origin's side of one migration.
struct Outgoing {
    ctl: Sender<Ctl>,
    out: Option<File>,
    err: Option<File>,
    exit: Option<Sender<ExitStatus>>,
}

/// Migrations this agent takes part in.
#[derive(Default)]
pub(crate) struct Table {
    next: AtomicU32,
    /// Destination: image pieces of `(origin, mig)`, and of restores
    /// requested as `(peer, req)`.
    incoming: Mutex<HashMap<(u16, u32), Sender<Piece>>>,
    restores: Mutex<HashMap<(u16, u32), Sender<Piece>>>,
    /// Origin: by `(destination, mig)`.
    outgoing: Mutex<HashMap<(u16, u32), Outgoing>>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mover::Table")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a finished move reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveReport {
    pub new_pid: u32,
    /// From freezing the original to the copy running.
    pub downtime: Duration,
    pub total: Duration,
    pub image_bytes: u64,
}

/// Sends whatever is written as messages of at most `MAX_CHUNK` bytes.
struct ChunkWriter<'a, F: FnMut(Vec<u8>) -> Msg> {
    agent: &'a Agent,
    to: u16,
    wrap: F,
    buf: Vec<u8>,
    sent: u64,
}

impl<F: FnMut(Vec<u8>) -> Msg> ChunkWriter<'_, F> {
    fn push(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::replace(&mut self.buf, Vec::with_capacity(MAX_CHUNK));
        self.sent += bytes.len() as u64;
        self.agent
            .send(self.to, &(self.wrap)(bytes))
            .map_err(|e| io::Error::other(crate::error_text(&e)))
    }
}

impl<F: FnMut(Vec<u8>) -> Msg> Write for ChunkWriter<'_, F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(MAX_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_CHUNK {
            self.push()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push()
    }
}

/// Reads an image from pieces as they arrive.
struct PieceReader {
    rx: Receiver<Piece>,
    buf: Vec<u8>,
    at: usize,
    done: bool,
}

impl Read for PieceReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv_timeout(PIECE_TIMEOUT) {
                Ok(Piece::Bytes(b)) => {
                    self.buf = b;
                    self.at = 0;
                }
                Ok(Piece::End) => self.done = true,
                Ok(Piece::Abort) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the origin aborted the transfer",
                    ))
                }
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no part of the image arrived for {PIECE_TIMEOUT:?}"),
                    ))
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn pipe() -> io::Result<(File, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    Ok((File::from(r), w))
}

fn dev_null() -> io::Result<OwnedFd> {
    Ok(File::options()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

/// Waits for `pid` (a child of this process) and returns how it ended.
fn wait_pid(pid: u32) -> ExitStatus {
    use nix::sys::wait::{waitpid, WaitStatus};
    let p = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(-1));
    loop {
        match waitpid(p, None) {
            Ok(WaitStatus::Exited(_, c)) => return ExitStatus::Code(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return ExitStatus::Signal(s as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return ExitStatus::Code(-1),
        }
    }
}

impl Agent {
    /// Moves local process `pid` to endpoint `to` (stop-and-copy). Runs on
    /// the calling thread, which must stay the same from freeze to kill
    /// (ptrace). On error the original runs on, untouched.
    pub fn move_out(&self, pid: u32, to: u16) -> Result<MoveReport, String> {
        let t0 = Instant::now();
        let pid_i = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
        let frozen = migrate::freeze(pid_i).map_err(|e| crate::error_text(&e))?;
        // The original's own stdout and stderr, for the copy's output: opened
        // now, while the process still holds them.
        let open_fd = |n: u32| {
            File::options()
                .write(true)
                .open(format!("/proc/{pid}/fd/{n}"))
                .ok()
        };
        let (out, err) = (open_fd(1), open_fd(2));
        let mig = self.migrations.next.fetch_add(1, Ordering::Relaxed);
        let (ctl_tx, ctl_rx) = bounded(4);
        lock(&self.migrations.outgoing).insert(
            (to, mig),
            Outgoing {
                ctl: ctl_tx,
                out,
                err,
                exit: None,
            },
        );
        let forget = || {
            lock(&self.migrations.outgoing).remove(&(to, mig));
        };
        let streamed = (|| -> Result<u64, String> {
            self.send(to, &Msg::MigrateBegin { mig })
                .map_err(|e| crate::error_text(&e))?;
            let mut w = ChunkWriter {
                agent: self,
                to,
                wrap: |bytes| Msg::MigrateChunk { mig, bytes },
                buf: Vec::with_capacity(MAX_CHUNK),
                sent: 0,
            };
            frozen
                .write_image(&mut w, ImageOptions::default())
                .map_err(|e| crate::error_text(&e))?;
            w.flush().map_err(|e| format!("sending the image: {e}"))?;
            self.send(to, &Msg::MigrateEnd { mig })
                .map_err(|e| crate::error_text(&e))?;
            Ok(w.sent)
        })();
        let image_bytes = match streamed {
            Ok(n) => n,
            Err(e) => {
                let _ = self.send(to, &Msg::MigrateAbort { mig });
                forget();
                drop(frozen);
                return Err(format!("{e}; the original runs on"));
            }
        };
        match ctl_rx.recv_timeout(ANSWER_TIMEOUT) {
            Ok(Ctl::Running(new_pid)) => {
                let (etx, erx) = bounded(1);
                if let Some(o) = lock(&self.migrations.outgoing).get_mut(&(to, mig)) {
                    o.exit = Some(etx);
                }
                // Before the kill: whoever waits for the original learns
                // its real end from the destination.
                self.mark_moved(pid, erx);
                let downtime = t0.elapsed();
                frozen.kill();
                Ok(MoveReport {
                    new_pid,
                    downtime,
                    total: t0.elapsed(),
                    image_bytes,
                })
            }
            Ok(Ctl::Failed(m)) => {
                forget();
                drop(frozen);
                Err(format!(
                    "endpoint {to} could not restore it: {m}; the original runs on"
                ))
            }
            Err(_) => {
                let _ = self.send(to, &Msg::MigrateAbort { mig });
                forget();
                drop(frozen);
                Err(format!(
                    "endpoint {to} did not say the copy runs within {ANSWER_TIMEOUT:?}; the original runs on"
                ))
            }
        }
    }

    /// Writes an image of `pid` to the requester as `ImageChunk`s; the
    /// process runs on unless `kill`.
    fn checkpoint_to(&self, peer: u16, req: u32, pid: u32, kill: bool) -> Result<(), String> {
        let pid_i = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
        let frozen = migrate::freeze(pid_i).map_err(|e| crate::error_text(&e))?;
        let mut w = ChunkWriter {
            agent: self,
            to: peer,
            wrap: |bytes| Msg::ImageChunk { req, bytes },
            buf: Vec::with_capacity(MAX_CHUNK),
            sent: 0,
        };
        frozen
            .write_image(&mut w, ImageOptions::default())
            .map_err(|e| crate::error_text(&e))?;
        w.flush().map_err(|e| e.to_string())?;
        if kill {
            frozen.kill();
        } else {
            frozen.resume();
        }
        Ok(())
    }

    /// Restores from `pieces`; on success runs `report` with the new pid,
    /// then pumps output through `output` and returns the final status.
    fn restore_and_run(
        &self,
        pieces: Receiver<Piece>,
        started: impl FnOnce(u32),
        output: impl Fn(Stream, Option<Vec<u8>>) + Send + Sync,
    ) -> Result<ExitStatus, String> {
        let reader = PieceReader {
            rx: pieces,
            buf: Vec::new(),
            at: 0,
            done: false,
        };
        let (out_r, out_w) = pipe().map_err(|e| e.to_string())?;
        let (err_r, err_w) = pipe().map_err(|e| e.to_string())?;
        let plan = StdioPlan {
            stdin: dev_null().map_err(|e| e.to_string())?,
            stdout: out_w,
            stderr: err_w,
        };
        let restored = migrate::restore(reader, plan).map_err(|e| crate::error_text(&e))?;
        let pid = u32::try_from(restored.pid).unwrap_or(0);
        started(pid);
        // Pumps first, wait after (see `Agent::start_exec`: no waitpid
        // while a migration may hold the process under ptrace).
        thread::scope(|s| {
            for (stream, mut r) in [(Stream::Stdout, out_r), (Stream::Stderr, err_r)] {
                let output = &output;
                s.spawn(move || {
                    let mut buf = vec![0u8; MAX_CHUNK];
                    loop {
                        match r.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => output(stream, Some(buf[..n].to_vec())),
                        }
                    }
                    output(stream, None);
                });
            }
        });
        let local = wait_pid(pid);
        Ok(self.final_status(pid, local))
    }

    /// Handles the migration messages; gives back any other message.
    pub(crate) fn handle_migration(self: &Arc<Self>, peer: u16, m: Msg) -> Option<Msg> {
        let t = &self.migrations;
        match m {
            Msg::MigrateOut { req, pid, to } => {
                let me = Arc::clone(self);
                thread::spawn(move || {
                    let answer = match me.move_out(pid, to) {
                        Ok(r) => Msg::MigrateReport {
                            req,
                            new_pid: r.new_pid,
                            downtime_ns: u64::try_from(r.downtime.as_nanos()).unwrap_or(u64::MAX),
                            total_ns: u64::try_from(r.total.as_nanos()).unwrap_or(u64::MAX),
                            image_bytes: r.image_bytes,
                        },
                        Err(message) => Msg::Failed { req, message },
                    };
                    let _ = me.send(peer, &answer);
                });
            }
            Msg::MigrateBegin { mig } => {
                let (tx, rx) = bounded(64);
                lock(&t.incoming).insert((peer, mig), tx);
                let me = Arc::clone(self);
                thread::spawn(move || {
                    let result = me.restore_and_run(
                        rx,
                        |pid| {
                            lock(&me.migrations.incoming).remove(&(peer, mig));
                            let _ = me.send(peer, &Msg::MigrateRunning { mig, pid });
                        },
                        |stream, bytes| {
                            if let Some(bytes) = bytes {
                                let _ = me.send(peer, &Msg::MigratedOutput { mig, stream, bytes });
                            }
                        },
                    );
                    lock(&me.migrations.incoming).remove(&(peer, mig));
                    let _ = match result {
                        Ok(status) => me.send(peer, &Msg::MigratedExit { mig, status }),
                        Err(message) => me.send(peer, &Msg::MigrateFailed { mig, message }),
                    };
                });
            }
            Msg::MigrateChunk { mig, bytes } => feed(&t.incoming, (peer, mig), Piece::Bytes(bytes)),
            Msg::MigrateEnd { mig } => feed(&t.incoming, (peer, mig), Piece::End),
            Msg::MigrateAbort { mig } => feed(&t.incoming, (peer, mig), Piece::Abort),
            Msg::MigrateRunning { mig, pid } => {
                if let Some(o) = lock(&t.outgoing).get(&(peer, mig)) {
                    let _ = o.ctl.send(Ctl::Running(pid));
                }
            }
            Msg::MigrateFailed { mig, message } => {
                if let Some(o) = lock(&t.outgoing).get(&(peer, mig)) {
                    let _ = o.ctl.send(Ctl::Failed(message));
                }
            }
            Msg::MigratedOutput { mig, stream, bytes } => {
                let mut out = lock(&t.outgoing);
                if let Some(o) = out.get_mut(&(peer, mig)) {
                    let f = if stream == Stream::Stderr {
                        &mut o.err
                    } else {
                        &mut o.out
                    };
                    if let Some(file) = f {
                        if file.write_all(&bytes).is_err() {
                            *f = None;
                        }
                    }
                }
            }
            Msg::MigratedExit { mig, status } => {
                let o = lock(&t.outgoing).remove(&(peer, mig));
                if let Some(o) = o {
                    // Closing the forwarded descriptors lets the original's
                    // readers see end of file.
                    drop(o.out);
                    drop(o.err);
                    if let Some(exit) = o.exit {
                        let _ = exit.send(status);
                    }
                }
            }
            Msg::Checkpoint { req, pid, kill } => {
                let me = Arc::clone(self);
                thread::spawn(move || {
                    let answer = match me.checkpoint_to(peer, req, pid, kill) {
                        Ok(()) => Msg::Done { req },
                        Err(message) => Msg::Failed { req, message },
                    };
                    let _ = me.send(peer, &answer);
                });
            }
            Msg::RestoreImage { req } => {
                let (tx, rx) = bounded(64);
                lock(&t.restores).insert((peer, req), tx);
                let me = Arc::clone(self);
                thread::spawn(move || {
                    let result = me.restore_and_run(
                        rx,
                        |pid| {
                            lock(&me.migrations.restores).remove(&(peer, req));
                            let _ = me.send(peer, &Msg::Started { req, pid });
                        },
                        |stream, bytes| {
                            let m = match bytes {
                                Some(bytes) => Msg::Data { req, stream, bytes },
                                None => Msg::Eof { req, stream },
                            };
                            let _ = me.send(peer, &m);
                        },
                    );
                    lock(&me.migrations.restores).remove(&(peer, req));
                    let _ = match result {
                        Ok(status) => me.send(peer, &Msg::Exited { req, status }),
                        Err(message) => me.send(peer, &Msg::Failed { req, message }),
                    };
                });
            }
            Msg::ImageChunk { req, bytes } => {
                // Input of a restore we run, or an answer to our checkpoint.
                let tx = lock(&t.restores).get(&(peer, req)).cloned();
                match tx {
                    Some(tx) => {
                        let piece = if bytes.is_empty() {
                            Piece::End
                        } else {
                            Piece::Bytes(bytes)
                        };
                        let _ = tx.send(piece);
                    }
                    None => return Some(Msg::ImageChunk { req, bytes }),
                }
            }
            other => return Some(other),
        }
        None
    }
}

fn feed(map: &Mutex<HashMap<(u16, u32), Sender<Piece>>>, key: (u16, u32), p: Piece) {
    let tx = lock(map).get(&key).cloned();
    if let Some(tx) = tx {
        // A full channel means the restore stalled: wait (backpressure).
        let _ = tx.send(p);
    }
}
