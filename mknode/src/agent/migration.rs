//! The migration facet: moving a process between kernels over agent links,
//! the protocol around `migrate`'s capture and restore.
//!
//! Origin: freeze the process, stream its image to the destination in
//! `MigrateChunk`s, wait for `MigrateRunning`; then kill the frozen
//! original, or — on any failure before that — let it go on untouched.
//! Destination: restore from the stream with pipes for stdout/stderr, say
//! `MigrateRunning`, and carry the process's output and exit status to its
//! *home*: the kernel whose exec (or restore) holds its first output, the
//! origin of its first move. The home writes the bytes to the original's
//! own descriptors (opened through `/proc/<pid>/fd` before it was killed)
//! and reports the status where the original's would have gone.
//!
//! A process that moves on from a kernel it was moved to sends its output
//! to the home straight from wherever it runs, through no kernel it left:
//! nothing stays behind on those (no relay, no thread), and their end does
//! not cut its output. The kernel it leaves sends what the process wrote
//! there, then `MigratedAway { to }`; the home holds what comes from `to`
//! until then, so its first stream never sees a gap or a reordering.
//!
//! Lazy moves add page fetches (`PageFetch` → `PageData`/`PageRefused`),
//! background pushes, and `PagesDone`/`PagesIn` to end them. A lazy tree
//! (`MigrateLazyTreeOut`) has a page server and a pager per live process,
//! whose page messages go by `wire::tree_page_id(mig, k)`; the destination
//! says `PagesIn` once every process has all its pages.
//!
//! Checkpoint and restore through a peer use the same pieces: the image
//! goes to the requester in `ImageChunk`s, or comes from it.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::exec::{Exec, ProcessLost};
use super::{lock, Agent, AgentError, AgentRef, Facet, Peer};
use crate::migrate::{
    self, CaptureError, ImageOptions, LazyLink, LazyOptions, PageServer, PageSource, PagerOptions,
    Pushed, RestoreError, SourceError, StdioPlan,
};
use crate::wire::{ExitStatus, Kind, Msg, Stream, MAX_CHUNK};

/// How long the origin waits for the destination to say "running" after
/// the whole image went out, and how long a destination waits for the next
/// piece of an image.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the origin of a lazy move waits, once every page went out, for
/// the destination to say it needs no more.
const PAGES_IN_TIMEOUT: Duration = Duration::from_secs(30);
const PAGE: usize = migrate::image::PAGE as usize;

pub(super) enum Piece {
    Bytes(Vec<u8>),
    End,
    Abort,
}

/// Makes the way in of a lazy process's pages: `None` for a lone process,
/// `Some(k)` for a tree's `k`-th live process.
type LinkFactory = Box<dyn FnMut(Option<usize>) -> LazyLink + Send>;

enum Ctl {
    Running(u32),
    Failed(String),
    /// The destination's kernel went down (see `Table::peer_lost`).
    Lost(String),
    /// Lazy mode: the destination needs no more pages.
    PagesIn,
}

/// The origin's side of one migration: the destination's answers (a few
/// per move; unbounded, so that the receive thread handing one over never
/// waits on a move busy streaming its image).
struct Outgoing {
    ctl: Sender<Ctl>,
}

/// How a process moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every page before the copy runs.
    StopCopy,
    /// The copy runs first; its pages follow (post-copy).
    Lazy,
    /// The process with all its descendants (`migrate::freeze_tree`),
    /// stop-and-copy.
    Tree,
    /// A tree, each process lazy: a page server per process, its pages
    /// under [`crate::wire::tree_page_id`].
    LazyTree,
}

impl Mode {
    /// The wire's `(lazy, tree)`.
    pub fn from_flags(lazy: bool, tree: bool) -> Mode {
        match (lazy, tree) {
            (true, true) => Mode::LazyTree,
            (false, true) => Mode::Tree,
            (true, false) => Mode::Lazy,
            (false, false) => Mode::StopCopy,
        }
    }

    /// Whether the copy runs before its pages have all moved.
    pub fn lazy(self) -> bool {
        matches!(self, Mode::Lazy | Mode::LazyTree)
    }

    /// Whether the process moves with its descendants.
    pub fn tree(self) -> bool {
        matches!(self, Mode::Tree | Mode::LazyTree)
    }
}

/// How a moved process ended, or why it is lost.
type End = Result<ExitStatus, ProcessLost>;

/// Where a moved process's end is told.
type ExitTo = Sender<End>;

/// The home's side of a process that moved away (see the module doc), by
/// the home's `mig` of its first move.
struct Homed {
    /// Its output, to the thread that writes it where the original's went
    /// ([`forward_output`]): a link's receive thread never waits on a pipe.
    forward: Sender<Forward>,
    /// Once the first move's copy runs: where its end goes.
    exit: Option<ExitTo>,
    /// Its end, when it came before `exit` was known.
    ended: Option<End>,
    /// Where it runs, as far as the messages applied so far say.
    at: u16,
    /// What came from kernels it has not been handed to yet, in order.
    held: HashMap<u16, VecDeque<FromAway>>,
}

/// What the kernel a process runs on tells its home.
enum FromAway {
    Output(Stream, Vec<u8>),
    /// It moved on to this kernel; all it wrote before has been sent.
    Away(u16),
    Exit(ExitStatus),
}

impl Homed {
    /// It ended (or is lost): the original's descriptors close once all
    /// before is written, then the end is told (or kept until `exit` is
    /// known). True when the entry can go.
    fn end(&mut self, end: End) -> bool {
        let tell = match self.exit.take() {
            Some(exit) => Some((exit, end)),
            None => {
                self.ended = Some(end);
                None
            }
        };
        let done = tell.is_some();
        let _ = self.forward.send(Forward::End(tell));
        done
    }
}

/// A process this kernel restored for a move: where its home is, and
/// where it went if it moved on.
struct Hop {
    home: u16,
    mig: u32,
    moved_to: Option<u16>,
}

/// What [`forward_output`] is given.
enum Forward {
    Bytes(Stream, Vec<u8>),
    /// The process ended: close the original's descriptors once everything
    /// before is written (its readers then see the end of the data), then
    /// tell its end, if there is somewhere to tell it yet.
    End(Option<(ExitTo, End)>),
}

/// Writes a copy's forwarded output into the original's stdout and stderr
/// (pipes to a relay of an earlier hop, or to the exec), blocking as long
/// as they are full, until the copy's end or until the move is forgotten.
fn forward_output(mut out: Option<File>, mut err: Option<File>, rx: Receiver<Forward>) {
    for f in rx {
        match f {
            Forward::Bytes(stream, bytes) => {
                let file = if stream == Stream::Stderr {
                    &mut err
                } else {
                    &mut out
                };
                if let Some(w) = file {
                    if w.write_all(&bytes).is_err() {
                        *file = None;
                    }
                }
            }
            Forward::End(tell) => {
                drop(out.take());
                drop(err.take());
                if let Some((exit, end)) = tell {
                    let _ = exit.send(end);
                }
                return;
            }
        }
    }
}

/// The pages a fetch asked for, or why the origin refused.
type FetchAnswer = Result<Vec<u8>, SourceError>;

/// See the module doc: the migrations this agent takes part in.
pub struct Migration {
    agent: AgentRef,
    next: AtomicU32,
    /// Destination: image pieces of `(origin, mig)`, and of restores
    /// requested as `(peer, req)`.
    incoming: Mutex<HashMap<(u16, u32), Sender<Piece>>>,
    restores: Mutex<HashMap<(u16, u32), Sender<Piece>>>,
    /// Origin: by `(destination, mig)`.
    outgoing: Mutex<HashMap<(u16, u32), Outgoing>>,
    /// Home: processes that moved away, by this agent's `mig` of their
    /// first move.
    homed: Mutex<HashMap<u32, Homed>>,
    /// Processes restored here for a move, by pid.
    hops: Mutex<HashMap<u32, Hop>>,
    /// Origin, lazy mode: what answers page fetches, by `(destination, mig)`.
    servers: Mutex<HashMap<(u16, u32), PageServer>>,
    /// Destination, lazy mode: background pushes by `(origin, mig)`, and
    /// fetches waiting for their answer by `(origin, mig, id)`.
    pushes: Mutex<HashMap<(u16, u32), Sender<Pushed>>>,
    fetches: Mutex<HashMap<(u16, u32, u32), Sender<FetchAnswer>>>,
    next_fetch: AtomicU32,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Migration")
    }
}

/// What a finished move reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveReport {
    pub new_pid: u32,
    /// From freezing the original to the copy running.
    pub downtime: Duration,
    pub total: Duration,
    pub image_bytes: u64,
    /// Pages carried, with their content or marked all-zero (in the image
    /// and, lazily, after it).
    pub pages: u64,
}

/// What a move tells its caller as it goes ([`Migration::move_out`]).
pub trait MoveWatch {
    /// The copy runs on the destination as `new_pid` after `downtime`.
    fn running(&self, new_pid: u32, downtime: Duration);
    /// `bytes` of image and pages have gone so far; called with the first
    /// chunk, then at most every [`SENT_EVERY`] while they flow.
    fn sent(&self, _bytes: u64) {}
}

/// A closure watches only for the copy running.
impl<F: Fn(u32, Duration)> MoveWatch for F {
    fn running(&self, new_pid: u32, downtime: Duration) {
        self(new_pid, downtime);
    }
}

/// A move asked for by a peer: what it says goes back as progress answers
/// to the request (`MigrateProgress`, `MigrateSent`).
struct Answers<'a> {
    agent: &'a Agent,
    peer: u16,
    req: u32,
}

impl MoveWatch for Answers<'_> {
    fn running(&self, new_pid: u32, downtime: Duration) {
        let _ = self.agent.send(
            self.peer,
            &Msg::MigrateProgress {
                req: self.req,
                new_pid,
                downtime_ns: nanos(downtime),
            },
        );
    }
    fn sent(&self, bytes: u64) {
        let _ = self.agent.try_send(
            self.peer,
            &Msg::MigrateSent {
                req: self.req,
                bytes,
            },
        );
    }
}

/// How often a move says how much has gone.
pub const SENT_EVERY: Duration = Duration::from_millis(250);

/// Calls `f` with a running count, at most every [`SENT_EVERY`].
struct Ticker<'a> {
    f: &'a dyn Fn(u64),
    next: Instant,
}

impl<'a> Ticker<'a> {
    /// The first tick is told at once (a move's progress starts with it).
    fn new(f: &'a dyn Fn(u64)) -> Self {
        Ticker {
            f,
            next: Instant::now(),
        }
    }
    fn tick(&mut self, bytes: u64) {
        let now = Instant::now();
        if now >= self.next {
            self.next = now + SENT_EVERY;
            (self.f)(bytes);
        }
    }
}

/// Sends whatever is written as messages of at most `MAX_CHUNK` bytes.
pub(super) struct ChunkWriter<'a, F: FnMut(Vec<u8>) -> Msg> {
    agent: &'a Agent,
    to: u16,
    wrap: F,
    buf: Vec<u8>,
    sent: u64,
    ticker: Option<Ticker<'a>>,
}

impl<'a, F: FnMut(Vec<u8>) -> Msg> ChunkWriter<'a, F> {
    pub(super) fn new(agent: &'a Agent, to: u16, wrap: F) -> Self {
        ChunkWriter {
            agent,
            to,
            wrap,
            buf: Vec::with_capacity(MAX_CHUNK),
            sent: 0,
            ticker: None,
        }
    }

    /// Tells `sent` the bytes sent so far as they go (every [`SENT_EVERY`]).
    fn telling(mut self, sent: &'a dyn Fn(u64)) -> Self {
        self.ticker = Some(Ticker::new(sent));
        self
    }

    fn push(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::replace(&mut self.buf, Vec::with_capacity(MAX_CHUNK));
        self.sent += bytes.len() as u64;
        if let Some(t) = &mut self.ticker {
            t.tick(self.sent);
        }
        self.agent
            .send(self.to, &(self.wrap)(bytes))
            .map_err(io::Error::other)
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
pub(super) struct PieceReader {
    rx: Receiver<Piece>,
    buf: Vec<u8>,
    at: usize,
    done: bool,
}

impl PieceReader {
    pub(super) fn new(rx: Receiver<Piece>) -> Self {
        PieceReader {
            rx,
            buf: Vec::new(),
            at: 0,
            done: false,
        }
    }
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

pub(super) fn pipe() -> io::Result<(File, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    Ok((File::from(r), w))
}

pub(super) fn dev_null() -> io::Result<OwnedFd> {
    Ok(File::options()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

/// Waits for `pid` (a child of this process) and returns how it ended.
pub(super) fn wait_pid(pid: u32) -> ExitStatus {
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

/// A move did not happen; unless said otherwise, the original runs on,
/// untouched.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("pid {0} out of range")]
    Pid(u32),
    #[error(
        "{peer} could not restore the process: {problems}; nothing was frozen, the original runs on"
    )]
    NotRestorable { peer: Peer, problems: String },
    /// The process could not be frozen (refused, gone, not ours...).
    #[error(transparent)]
    Freeze(CaptureError),
    #[error("telling {peer} of the move failed; nothing was frozen, the original runs on")]
    Announce {
        peer: Peer,
        #[source]
        source: AgentError,
    },
    #[error("sending the image to {peer} failed; the original runs on")]
    Send {
        peer: Peer,
        #[source]
        source: SendError,
    },
    #[error("{peer} could not restore it: {message}; the original runs on")]
    Refused { peer: Peer, message: String },
    /// The destination's kernel went down during the move.
    #[error("{why}; the original runs on")]
    Lost { why: String },
    /// The destination's kernel went down after the copy ran (in lazy
    /// mode: before all its pages had moved): the process is lost with it.
    #[error("{why}, after the copy ran there: the process is lost with it (the original, older than the copy, was killed)")]
    CopyLost { why: String },
    #[error("{peer} did not say the copy runs within {timeout:?}; the original runs on")]
    NoAnswer { peer: Peer, timeout: Duration },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// An image could not be sent to a peer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("flushing the last piece")]
    Flush(#[source] io::Error),
}

/// A process could not be restored and run here.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot make the pipes for its output")]
    Pipes(#[source] io::Error),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Lost(#[from] ProcessLost),
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Migration {
    pub fn new(agent: AgentRef) -> Self {
        Migration {
            agent,
            next: AtomicU32::new(0),
            incoming: Mutex::new(HashMap::new()),
            restores: Mutex::new(HashMap::new()),
            outgoing: Mutex::new(HashMap::new()),
            homed: Mutex::new(HashMap::new()),
            hops: Mutex::new(HashMap::new()),
            servers: Mutex::new(HashMap::new()),
            pushes: Mutex::new(HashMap::new()),
            fetches: Mutex::new(HashMap::new()),
            next_fetch: AtomicU32::new(0),
        }
    }

    /// Moves local process `pid` to endpoint `to`. Runs on the calling
    /// thread, which must stay the same from freeze to kill (ptrace). On
    /// error the original runs on, untouched (but for
    /// [`MoveError::CopyLost`]: the copy had taken over).
    ///
    /// Stop-and-copy sends every page before the copy runs. `lazy` resumes
    /// the copy after the eager pages; the rest is served on demand and
    /// pushed in the background, and the original is killed once every page
    /// has gone (and the destination says it needs no more). Returns then,
    /// with the downtime (freeze to copy running) and the total; `watch`
    /// is told as soon as the copy runs, with its pid and the downtime, and
    /// how many bytes have gone while they flow.
    ///
    /// `any_cpu`: the destination is not asked for the CPU extensions the
    /// program picked its code for ([`migrate::cpu::unchecked`]).
    pub fn move_out(
        &self,
        pid: u32,
        to: u16,
        (mode, any_cpu): (Mode, bool),
        watch: impl MoveWatch,
    ) -> Result<MoveReport, MoveError> {
        let agent = self.agent.get()?;
        let lazy = mode.lazy();
        let t0 = Instant::now();
        let pid_i = i32::try_from(pid).map_err(|_| MoveError::Pid(pid))?;
        // Another kernel build is fine (the restore redirects the vDSO);
        // another CPU is the probe's to refuse (`restorable_there`, which
        // refuses a lost destination first).
        let pids = if mode.tree() {
            // (Unreadable: the freeze will say what is wrong.)
            migrate::tree_of(pid_i).unwrap_or_else(|_| vec![pid_i])
        } else {
            vec![pid_i]
        };
        // Until the image is written (the end of this function).
        let _unchecked = any_cpu.then(|| migrate::cpu::unchecked(&pids));
        self.restorable_there(&agent, to, &pids)?;
        // Below 2^24: a lazy tree's processes go by ids above (`wire::tree_page_id`).
        let mig = self.next.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        // A process restored here for a move keeps its home; one that
        // started here (or was restored for a peer's request) makes this
        // its home.
        let hop = lock(&self.hops).get(&pid).map(|h| (h.home, h.mig));
        let (home, home_mig) = hop.unwrap_or((agent.id(), mig));
        let at_home = hop.is_none();
        let (ctl_tx, ctl_rx) = unbounded();
        lock(&self.outgoing).insert((to, mig), Outgoing { ctl: ctl_tx });
        // The destination hears of the move before the freeze: it forks
        // and empties the stub meanwhile (~1.5 ms no longer in the
        // downtime); a freeze that fails aborts it.
        let begin = if lazy {
            Msg::MigrateBeginLazy {
                mig,
                home,
                home_mig,
            }
        } else {
            Msg::MigrateBegin {
                mig,
                home,
                home_mig,
            }
        };
        if let Err(source) = agent.send(to, &begin) {
            lock(&self.outgoing).remove(&(to, mig));
            return Err(MoveError::Announce {
                peer: agent.peer(to),
                source,
            });
        }
        let frozen = migrate::freeze_any(pid_i, mode.tree());
        let frozen = match frozen {
            Ok(f) => f,
            Err(e) => {
                let _ = agent.send(to, &Msg::MigrateAbort { mig });
                lock(&self.outgoing).remove(&(to, mig));
                return Err(MoveError::Freeze(e));
            }
        };
        if at_home {
            // The original's own stdout and stderr, for the copy's output:
            // opened now, while the process still holds them.
            let open_fd = |n: u32| {
                File::options()
                    .write(true)
                    .open(format!("/proc/{pid}/fd/{n}"))
                    .ok()
            };
            let (out, err) = (open_fd(1), open_fd(2));
            let (forward, forwarded) = unbounded();
            thread::spawn(move || forward_output(out, err, forwarded));
            lock(&self.homed).insert(
                mig,
                Homed {
                    forward,
                    exit: None,
                    ended: None,
                    at: to,
                    held: HashMap::new(),
                },
            );
        }
        // The ids the page servers go by: the move's, or one per process
        // of a lazy tree.
        let lazy_ids: std::cell::RefCell<Vec<u32>> = Default::default();
        let forget = || {
            lock(&self.outgoing).remove(&(to, mig));
            let mut servers = lock(&self.servers);
            for id in lazy_ids.borrow().iter() {
                servers.remove(&(to, *id));
            }
            if at_home {
                lock(&self.homed).remove(&mig);
            }
        };
        let sent = |bytes| watch.sent(bytes);
        let streamed = (|| -> Result<(u64, u64), SendError> {
            let mut w = ChunkWriter::new(&agent, to, |bytes| Msg::MigrateChunk { mig, bytes })
                .telling(&sent);
            let stats = match (&frozen, lazy) {
                (migrate::Captured::One(f), true) => {
                    let (stats, server) = f.write_lazy_image(&mut w, LazyOptions::default())?;
                    lock(&self.servers).insert((to, mig), server);
                    lazy_ids.borrow_mut().push(mig);
                    stats
                }
                (migrate::Captured::Tree(t), true) => {
                    let (stats, servers) = t.write_lazy_image(&mut w, LazyOptions::default())?;
                    for (k, server) in servers.into_iter().enumerate() {
                        let id = crate::wire::tree_page_id(mig, k);
                        lock(&self.servers).insert((to, id), server);
                        lazy_ids.borrow_mut().push(id);
                    }
                    stats
                }
                _ => frozen.write_image(&mut w, ImageOptions::default())?,
            };
            w.flush().map_err(SendError::Flush)?;
            agent.send(to, &Msg::MigrateEnd { mig })?;
            Ok((w.sent, stats.data_pages + stats.zero_pages))
        })();
        let (image_bytes, image_pages) = match streamed {
            Ok(n) => n,
            Err(source) => {
                let _ = agent.send(to, &Msg::MigrateAbort { mig });
                forget();
                drop(frozen);
                return Err(MoveError::Send {
                    peer: agent.peer(to),
                    source,
                });
            }
        };
        // A small lazy copy may have every page before its "running" is
        // sent: remember that answer.
        let mut pages_in = false;
        let answer = loop {
            match ctl_rx.recv_timeout(ANSWER_TIMEOUT) {
                Ok(Ctl::PagesIn) => pages_in = true,
                other => break other,
            }
        };
        let new_pid = match answer {
            Ok(Ctl::Running(new_pid)) => new_pid,
            failed => {
                forget();
                drop(frozen);
                return Err(match failed {
                    Ok(Ctl::Failed(message)) => MoveError::Refused {
                        peer: agent.peer(to),
                        message,
                    },
                    Ok(Ctl::Lost(why)) => MoveError::Lost { why },
                    // (`PagesIn` was consumed by the loop above.)
                    _ => {
                        let _ = agent.send(to, &Msg::MigrateAbort { mig });
                        MoveError::NoAnswer {
                            peer: agent.peer(to),
                            timeout: ANSWER_TIMEOUT,
                        }
                    }
                });
            }
        };
        // The destination may have gone down since it said "running"
        // (`peer_lost` kept that as the end, not knowing where it goes):
        // the copy ran, so the process is lost with it.
        let lost_already = if at_home {
            let (etx, erx) = bounded(1);
            let ended = {
                let mut homed = lock(&self.homed);
                match homed.get_mut(&mig).and_then(|h| h.ended.take()) {
                    Some(end) => {
                        homed.remove(&mig);
                        Some(end)
                    }
                    None => {
                        if let Some(h) = homed.get_mut(&mig) {
                            h.exit = Some(etx.clone());
                        }
                        None
                    }
                }
            };
            // Before the kill: whoever waits for the original learns its
            // real end from where it runs.
            agent.facet::<Exec>().mark_moved(pid, erx);
            match ended {
                Some(end) => {
                    let lost = end.as_ref().err().map(|l| l.why.clone());
                    let _ = etx.send(end);
                    lost
                }
                None => None,
            }
        } else {
            // Before the kill: the restore thread tells the home where the
            // process went once all it wrote here has gone.
            if let Some(h) = lock(&self.hops).get_mut(&pid) {
                h.moved_to = Some(to);
            }
            None
        };
        if let Some(why) = lost_already {
            forget();
            frozen.kill();
            return Err(MoveError::CopyLost { why });
        }
        let mut report = MoveReport {
            new_pid,
            // From the freeze: the preflight and the freeze's own checks
            // (smaps, a walk of the page tables) ran while the process did.
            downtime: frozen.frozen_at().elapsed(),
            total: t0.elapsed(),
            image_bytes,
            pages: image_pages,
        };
        watch.running(new_pid, report.downtime);
        let servers: Vec<(u32, PageServer)> = {
            let all = lock(&self.servers);
            lazy_ids
                .borrow()
                .iter()
                .filter_map(|id| Some((*id, all.get(&(to, *id))?.clone())))
                .collect()
        };
        if !servers.is_empty() {
            let sent_now = || servers.iter().map(|(_, s)| s.progress().sent).sum::<u64>();
            let eager = sent_now();
            // Pages pushed as a count of zeros carry no bytes.
            let zeros = Arc::new(AtomicU64::new(0));
            let after = |pages: u64| {
                let z = zeros.load(Ordering::Relaxed);
                image_bytes + pages.saturating_sub(eager).saturating_sub(z) * PAGE as u64
            };
            let finished = self.finish_lazy(
                &agent,
                (to, mig),
                (&servers, Arc::clone(&zeros)),
                &ctl_rx,
                pages_in,
                &|pages| sent(after(pages)),
            );
            forget_servers(&self.servers, to, &servers);
            if let Err(lost) = finished {
                // The copy ran and is lost with its kernel; the original
                // is older than the copy (resumed, it would print again
                // what the copy printed): it goes too, instead of staying
                // frozen. The home's entry stays: `peer_lost`, which sent
                // `Lost`, ends it next and tells the exec why. Removed here
                // first, the exec would take the original's kill for the
                // process's end (seen once in about 100 runs).
                lock(&self.outgoing).remove(&(to, mig));
                frozen.kill();
                return Err(lost);
            }
            // The servers count the image's eager pages too.
            let pages = sent_now();
            report.image_bytes = after(pages);
            report.pages = pages;
        }
        lock(&self.outgoing).remove(&(to, mig));
        frozen.kill();
        report.total = t0.elapsed();
        Ok(report)
    }

    /// The rest of a lazy move once the copy runs: pushes what is left,
    /// answers fetches meanwhile (in the receive thread), and returns when
    /// all has gone and the destination needs nothing more; or
    /// [`MoveError::CopyLost`] as soon as the destination's kernel goes
    /// down.
    fn finish_lazy(
        &self,
        agent: &Arc<Agent>,
        (to, mig): (u16, u32),
        (servers, zeros): (&[(u32, PageServer)], Arc<AtomicU64>),
        ctl_rx: &Receiver<Ctl>,
        mut pages_in: bool,
        sent: &dyn Fn(u64),
    ) -> Result<(), MoveError> {
        for (id, server) in servers {
            push_all(agent, to, *id, server.clone(), Arc::clone(&zeros));
        }
        // A destination that goes down stops the pushes (their sends
        // fail): without looking at the control channel meanwhile, this
        // would wait the whole 10 minutes, the original frozen and the
        // move unanswered. Each look also says how many pages have gone.
        let all_sent = Instant::now() + Duration::from_secs(600);
        let mut told = Instant::now();
        let progress = || servers.iter().map(|(_, s)| s.progress().sent).sum::<u64>();
        let mut waiting = servers.iter();
        let mut server = waiting.next();
        while let Some((_, s)) = server {
            if s.wait_all_sent(Duration::from_millis(100)) {
                server = waiting.next();
                continue;
            }
            match ctl_rx.try_recv() {
                Ok(Ctl::Lost(why)) => return Err(MoveError::CopyLost { why }),
                Ok(Ctl::PagesIn) => pages_in = true,
                Ok(_) | Err(_) => {}
            }
            if told.elapsed() >= SENT_EVERY {
                told = Instant::now();
                sent(progress());
            }
            if Instant::now() >= all_sent {
                log::warn!("migration {mig} to {to}: not every page went out in 10 min; the copy will be killed by its pager");
                break;
            }
        }
        // Fetches may still be on their way (sent before the push of the
        // same page arrived): serve them until the destination says it
        // needs nothing more.
        let deadline = Instant::now() + PAGES_IN_TIMEOUT;
        while !pages_in {
            let left = deadline.saturating_duration_since(Instant::now());
            match ctl_rx.recv_timeout(left) {
                Ok(Ctl::PagesIn) => pages_in = true,
                Ok(Ctl::Lost(why)) => return Err(MoveError::CopyLost { why }),
                Ok(_) => continue,
                Err(_) => {
                    log::warn!("migration {mig} to {to}: every page went out but the destination did not confirm within {PAGES_IN_TIMEOUT:?}; letting go of the original");
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Removes a move's page servers from `servers`.
fn forget_servers(
    servers: &Mutex<HashMap<(u16, u32), PageServer>>,
    to: u16,
    these: &[(u32, PageServer)],
) {
    let mut all = lock(servers);
    for (id, _) in these {
        all.remove(&(to, *id));
    }
}

/// Pushes every page `server` has not sent yet to `to`, under `id`, in a
/// thread of its own, then `PagesDone`; runs of zero pages go as a count
/// (added to `zeros`).
fn push_all(agent: &Arc<Agent>, to: u16, mig: u32, pusher: PageServer, zeros: Arc<AtomicU64>) {
    let me = Arc::clone(agent);
    thread::spawn(move || {
        let mut buf = Vec::new();
        while let Ok(Some(run)) = pusher.next_push(64, &mut buf) {
            // Runs of zero pages go as a count.
            let page = |k: usize| &buf[k * PAGE..(k + 1) * PAGE];
            let npages = buf.len() / PAGE;
            let mut i = 0;
            while i < npages {
                let zero = migrate::is_zero(page(i));
                let n = (i..npages)
                    .take_while(|&k| migrate::is_zero(page(k)) == zero)
                    .count();
                let addr = run.addr + (i * PAGE) as u64;
                let m = if zero {
                    zeros.fetch_add(n as u64, Ordering::Relaxed);
                    Msg::PagesZero {
                        mig,
                        addr,
                        npages: n as u32,
                    }
                } else {
                    Msg::PageData {
                        mig,
                        id: 0,
                        addr,
                        bytes: buf[i * PAGE..(i + n) * PAGE].to_vec(),
                    }
                };
                if me.send(to, &m).is_err() {
                    return;
                }
                i += n;
            }
        }
        let _ = me.send(to, &Msg::PagesDone { mig });
    });
}

impl Migration {
    /// Refuses at once a destination already taken as lost, instead of
    /// after each preflight question's timeout.
    fn reachable(agent: &Agent, to: u16) -> Result<(), MoveError> {
        match agent.lost(to) {
            Some(why) => Err(MoveError::Lost { why }),
            None => Ok(()),
        }
    }

    /// Refuses, before anything is frozen, a destination that could not
    /// restore the process: one where the files it has open cannot be
    /// opened (a guest that has no such path), or without time namespaces
    /// (its clocks would jump), or whose CPU lacks an extension their code
    /// was picked for.
    /// Whether it is the same file is checked on restore, against the size
    /// and time at the freeze. Without an answer the restore decides.
    pub(super) fn restorable_there(
        &self,
        agent: &Agent,
        to: u16,
        pids: &[i32],
    ) -> Result<(), MoveError> {
        Self::reachable(agent, to)?;
        // Unreadable: the freeze will say what is wrong with the process.
        let mut files: Vec<(String, migrate::FileKind)> = Vec::new();
        for &pid in pids {
            for f in migrate::files_of(pid).unwrap_or_default() {
                if !files.contains(&f) {
                    files.push(f);
                }
            }
        }
        let (paths, devices): (Vec<String>, Vec<bool>) = files
            .into_iter()
            .map(|(path, kind)| (path, kind == migrate::FileKind::Device))
            .unzip();
        // What their code was picked for: a process restored here may have
        // started on a CPU with fewer extensions than this one.
        let mut cpu: Vec<String> = pids.iter().flat_map(|&p| migrate::cpu::picked(p)).collect();
        cpu.sort();
        cpu.dedup();
        let Ok(Msg::RestoreProbed { problems, .. }) =
            agent.call(to, Duration::from_secs(10), |req| Msg::RestoreProbe {
                req,
                paths,
                devices,
                cpu,
                fp_size: migrate::cpu::fp_state_size(),
                xfeatures: migrate::cpu::xfeatures(),
            })
        else {
            return Ok(());
        };
        if problems.is_empty() {
            return Ok(());
        }
        Err(MoveError::NotRestorable {
            peer: agent.peer(to),
            problems: problems.join("; "),
        })
    }

    /// Writes an image of `pid` (with its descendants: `tree`) to the
    /// requester as `ImageChunk`s; the process runs on unless `kill`.
    fn checkpoint_to(
        &self,
        agent: &Agent,
        peer: u16,
        req: u32,
        (pid, tree): (u32, bool),
        kill: bool,
    ) -> Result<(), MoveError> {
        let pid_i = i32::try_from(pid).map_err(|_| MoveError::Pid(pid))?;
        let frozen = migrate::freeze_any(pid_i, tree).map_err(MoveError::Freeze)?;
        let mut w = ChunkWriter::new(agent, peer, |bytes| Msg::ImageChunk { req, bytes });
        let sent = frozen
            .write_image(&mut w, ImageOptions::default())
            .map_err(SendError::from)
            .and_then(|_| w.flush().map_err(SendError::Flush));
        if let Err(source) = sent {
            return Err(MoveError::Send {
                peer: agent.peer(peer),
                source,
            });
        }
        if kill {
            frozen.kill();
        } else {
            frozen.resume();
        }
        Ok(())
    }

    /// Restores from `pieces`; on success runs `started` with the new pid,
    /// then pumps output through `output` and returns the final status.
    fn restore_and_run(
        &self,
        agent: &Agent,
        pieces: Receiver<Piece>,
        lazy: Option<(LinkFactory, Box<dyn FnOnce() + Send>)>,
        started: impl FnOnce(u32),
        output: impl Fn(Stream, Option<Vec<u8>>) + Send + Sync,
    ) -> Result<ExitStatus, RunError> {
        let reader = PieceReader::new(pieces);
        let (out_r, out_w) = pipe().map_err(RunError::Pipes)?;
        let (err_r, err_w) = pipe().map_err(RunError::Pipes)?;
        let plan = StdioPlan {
            stdin: dev_null().map_err(RunError::Pipes)?,
            stdout: out_w,
            stderr: err_w,
        };
        let restored = match lazy {
            None => migrate::restore_any(reader, plan)?,
            Some((mut links, pages_in)) => {
                let (restored, pagers) =
                    migrate::restore_any_lazy(reader, plan, &mut links, PagerOptions::default())?;
                // Every process of it has all its pages: the origin may go.
                thread::spawn(move || {
                    for pager in pagers {
                        if let Err(e) = pager.wait() {
                            // On a guest this lands on the console.
                            log::error!("{}", crate::error_text(&e));
                        }
                    }
                    pages_in();
                });
                restored
            }
        };
        let pid = u32::try_from(restored.pid).unwrap_or(0);
        started(pid);
        // The pumps run until the output ends (elsewhere, if the process
        // moves on); the wait comes once the process has exited (see the
        // exec facet: no waitpid while a migration may hold it under
        // ptrace), so one that moves on is reaped here at once.
        let local = thread::scope(|s| {
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
            // (A tree's holder: it exits with the top once the tree is gone.)
            migrate::wait_exit(nix::unistd::Pid::from_raw(restored.reap));
            wait_pid(u32::try_from(restored.reap).unwrap_or(0))
        });
        Ok(agent.facet::<Exec>().final_status(pid, local)?)
    }
}

impl Migration {
    /// Answers a peer's request to move `pid` to `to` ([`Self::move_out`])
    /// when the move is over: in lazy mode, once every page has moved and
    /// the original is gone (its downtime ended long before); progress says
    /// when the copy runs.
    fn answer_move(
        self: Arc<Self>,
        agent: &Arc<Agent>,
        peer: u16,
        (req, pid, to): (u32, u32, u16),
        mode: (Mode, bool),
    ) {
        agent.answer_later(peer, req, move |me| {
            let r = self.move_out(
                pid,
                to,
                mode,
                Answers {
                    agent: me,
                    peer,
                    req,
                },
            )?;
            Ok::<_, MoveError>(Msg::MigrateReport {
                req,
                new_pid: r.new_pid,
                downtime_ns: nanos(r.downtime),
                total_ns: nanos(r.total),
                image_bytes: r.image_bytes,
                pages: r.pages,
            })
        })
    }
}

impl Facet for Migration {
    fn kinds(&self) -> &'static [Kind] {
        &[
            Kind::MigrateOut,
            Kind::MigrateTreeOut,
            Kind::MigrateLazyTreeOut,
            Kind::PageFetch,
            Kind::PageData,
            Kind::PageRefused,
            Kind::PagesZero,
            Kind::PagesDone,
            Kind::PagesIn,
            Kind::MigrateBegin,
            Kind::MigrateBeginLazy,
            Kind::MigrateChunk,
            Kind::MigrateEnd,
            Kind::MigrateAbort,
            Kind::MigrateRunning,
            Kind::MigrateFailed,
            Kind::MigratedOutput,
            Kind::MigratedExit,
            Kind::MigratedAway,
            Kind::Checkpoint,
            Kind::CheckpointTree,
            Kind::RestoreImage,
            Kind::ImageChunk,
            Kind::RestoreProbe,
        ]
    }

    /// `peer`'s kernel went down: moves to it fail now instead of at their
    /// timeout, processes that moved there end as lost (their execs on
    /// this side answer with why), and page fetches waiting on it fail.
    fn peer_lost(&self, peer: u16, why: &str) {
        let mut outgoing = lock(&self.outgoing);
        for ((to, _), o) in outgoing.iter_mut() {
            if *to == peer {
                let _ = o.ctl.try_send(Ctl::Lost(why.to_string()));
            }
        }
        // A move still in progress finds `Lost` queued on its control
        // channel and gives up on its own; the entries can go now.
        outgoing.retain(|(to, _), _| *to != peer);
        drop(outgoing);
        // Processes of ours that ran there are lost with it.
        lock(&self.homed).retain(|_, h| {
            h.at != peer
                || h.ended.is_some()
                || !h.end(Err(ProcessLost {
                    why: why.to_string(),
                }))
        });
        let mut fetches = lock(&self.fetches);
        for ((origin, _, _), tx) in fetches.iter() {
            if *origin == peer {
                let _ = tx.send(Err(SourceError::Lost(why.to_string())));
            }
        }
        fetches.retain(|(origin, _, _), _| *origin != peer);
    }

    fn handle(self: Arc<Self>, agent: &Arc<Agent>, peer: u16, m: Msg) -> Option<Msg> {
        match m {
            // A stat per file, on a thread of its own (a file system may
            // hang).
            Msg::RestoreProbe {
                req,
                paths,
                devices,
                cpu,
                fp_size,
                xfeatures,
            } => agent.answer_later(peer, req, move |_| {
                let mut problems = migrate::cpu::missing_here(&cpu, fp_size, xfeatures);
                problems.extend(probe_restore(&paths, &devices));
                Ok::<_, std::convert::Infallible>(Msg::RestoreProbed { req, problems })
            }),
            Msg::MigrateOut {
                req,
                pid,
                to,
                lazy,
                any_cpu,
            } => self.answer_move(
                agent,
                peer,
                (req, pid, to),
                (Mode::from_flags(lazy, false), any_cpu),
            ),
            Msg::MigrateTreeOut {
                req,
                pid,
                to,
                any_cpu,
            } => self.answer_move(agent, peer, (req, pid, to), (Mode::Tree, any_cpu)),
            Msg::MigrateLazyTreeOut {
                req,
                pid,
                to,
                any_cpu,
            } => self.answer_move(agent, peer, (req, pid, to), (Mode::LazyTree, any_cpu)),
            Msg::PageFetch { mig, id, addr, len } => {
                let server = lock(&self.servers).get(&(peer, mig)).cloned();
                let answer = match server {
                    Some(s) => {
                        let mut buf = vec![0u8; len as usize];
                        match s.read(addr, &mut buf) {
                            Ok(()) => Msg::PageData {
                                mig,
                                id,
                                addr,
                                bytes: buf,
                            },
                            Err(e) => Msg::PageRefused {
                                mig,
                                id,
                                message: crate::error_text(&e),
                            },
                        }
                    }
                    None => Msg::PageRefused {
                        mig,
                        id,
                        message: "no such migration here".into(),
                    },
                };
                let _ = agent.post(peer, &answer);
            }
            Msg::PageData {
                mig,
                id,
                addr,
                bytes,
            } => {
                if id == 0 {
                    let tx = lock(&self.pushes).get(&(peer, mig)).cloned();
                    if let Some(tx) = tx {
                        let _ = tx.send(Pushed::Pages { addr, data: bytes });
                    }
                } else if let Some(tx) = lock(&self.fetches).remove(&(peer, mig, id)) {
                    let _ = tx.send(Ok(bytes));
                }
            }
            Msg::PagesZero { mig, addr, npages } => {
                // Untrusted: a count no push makes is dropped (the pager
                // then fetches those pages, or says the push is bad).
                let tx = lock(&self.pushes).get(&(peer, mig)).cloned();
                match tx {
                    Some(tx) if (1..=migrate::image::MAX_RUN_PAGES).contains(&npages) => {
                        let data = vec![0u8; npages as usize * PAGE];
                        let _ = tx.send(Pushed::Pages { addr, data });
                    }
                    Some(_) => log::warn!(
                        "migration {mig} from {}: a push of {npages} zero pages dropped",
                        agent.peer(peer)
                    ),
                    None => {}
                }
            }
            Msg::PageRefused { mig, id, message } => {
                if let Some(tx) = lock(&self.fetches).remove(&(peer, mig, id)) {
                    let _ = tx.send(Err(SourceError::Refused(message)));
                }
            }
            Msg::PagesDone { mig } => {
                if let Some(tx) = lock(&self.pushes).remove(&(peer, mig)) {
                    let _ = tx.send(Pushed::Done);
                }
            }
            Msg::MigrateBegin {
                mig,
                home,
                home_mig,
            } => self.incoming(agent, peer, mig, (home, home_mig), false),
            Msg::MigrateBeginLazy {
                mig,
                home,
                home_mig,
            } => self.incoming(agent, peer, mig, (home, home_mig), true),
            Msg::MigrateChunk { mig, bytes } => {
                feed(&self.incoming, (peer, mig), Piece::Bytes(bytes))
            }
            Msg::MigrateEnd { mig } => feed(&self.incoming, (peer, mig), Piece::End),
            Msg::MigrateAbort { mig } => feed(&self.incoming, (peer, mig), Piece::Abort),
            Msg::MigrateRunning { mig, pid } => self.control(peer, mig, Ctl::Running(pid)),
            Msg::MigrateFailed { mig, message } => self.control(peer, mig, Ctl::Failed(message)),
            Msg::PagesIn { mig } => self.control(peer, mig, Ctl::PagesIn),
            Msg::MigratedOutput { mig, stream, bytes } => {
                self.home_hears(agent, peer, mig, FromAway::Output(stream, bytes))
            }
            Msg::MigratedExit { mig, status } => {
                self.home_hears(agent, peer, mig, FromAway::Exit(status))
            }
            Msg::MigratedAway { mig, to } => self.home_hears(agent, peer, mig, FromAway::Away(to)),
            Msg::Checkpoint { req, pid, kill } => agent.answer_later(peer, req, move |me| {
                self.checkpoint_to(me, peer, req, (pid, false), kill)?;
                Ok::<_, MoveError>(Msg::Done { req })
            }),
            Msg::CheckpointTree { req, pid, kill } => agent.answer_later(peer, req, move |me| {
                self.checkpoint_to(me, peer, req, (pid, true), kill)?;
                Ok::<_, MoveError>(Msg::Done { req })
            }),
            Msg::RestoreImage { req } => self.restore_for(agent, peer, req),
            Msg::ImageChunk { req, bytes } => {
                // Input of a restore we run, or an answer to our checkpoint.
                let tx = lock(&self.restores).get(&(peer, req)).cloned();
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

impl Migration {
    /// Hands a destination's answer to the move waiting for it.
    fn control(&self, peer: u16, mig: u32, c: Ctl) {
        let ctl = lock(&self.outgoing)
            .get(&(peer, mig))
            .map(|o| o.ctl.clone());
        if let Some(ctl) = ctl {
            let _ = ctl.send(c);
        }
    }

    /// Home: what the kernel `peer` says of process `mig` (see the module
    /// doc), applied in order, following each hand-over to the next kernel.
    fn home_hears(&self, agent: &Agent, peer: u16, mig: u32, what: FromAway) {
        let mut homed = lock(&self.homed);
        let Some(h) = homed.get_mut(&mig) else { return };
        if peer != h.at || h.ended.is_some() {
            h.held.entry(peer).or_default().push_back(what);
            return;
        }
        let mut next = Some(what);
        while let Some(w) = next
            .take()
            .or_else(|| h.held.get_mut(&h.at).and_then(VecDeque::pop_front))
        {
            let end = match w {
                FromAway::Output(stream, bytes) => {
                    let _ = h.forward.send(Forward::Bytes(stream, bytes));
                    continue;
                }
                FromAway::Away(to) => {
                    h.held.remove(&h.at);
                    h.at = to;
                    match agent.lost(to).filter(|_| to != agent.id()) {
                        Some(why) => Err(ProcessLost { why }),
                        None => continue,
                    }
                }
                FromAway::Exit(status) => Ok(status),
            };
            if h.end(end) {
                homed.remove(&mig);
            }
            return;
        }
    }

    /// Sends `what` to the home of a process restored here (or applies it,
    /// if that is this kernel).
    fn to_home(&self, agent: &Agent, (home, mig): (u16, u32), what: FromAway) {
        if home == agent.id() {
            return self.home_hears(agent, home, mig, what);
        }
        let m = match what {
            FromAway::Output(stream, bytes) => Msg::MigratedOutput { mig, stream, bytes },
            FromAway::Away(to) => Msg::MigratedAway { mig, to },
            FromAway::Exit(status) => Msg::MigratedExit { mig, status },
        };
        let _ = agent.send(home, &m);
    }

    /// Destination: an image from `peer` begins; restore and run it on a
    /// thread of its own, reporting to the origin, and what it writes and
    /// how it ends to its `home`.
    fn incoming(
        self: Arc<Self>,
        agent: &Arc<Agent>,
        peer: u16,
        mig: u32,
        home: (u16, u32),
        lazy: bool,
    ) {
        let (tx, rx) = bounded(64);
        lock(&self.incoming).insert((peer, mig), tx);
        // The pages' way in: the move's id for a lone process, one per
        // process of a tree (`wire::tree_page_id`), registered as the
        // restore reaches each.
        let links_made: Arc<Mutex<Vec<u32>>> = Arc::default();
        let link = lazy.then(|| {
            let this = Arc::clone(&self);
            let me = Arc::clone(agent);
            let made = Arc::clone(&links_made);
            let links: LinkFactory = Box::new(move |k| {
                let id = k.map_or(mig, |k| crate::wire::tree_page_id(mig, k));
                let (ptx, prx) = crossbeam_channel::unbounded();
                lock(&this.pushes).insert((peer, id), ptx);
                lock(&made).push(id);
                let source = RingSource {
                    agent: Arc::clone(&me),
                    origin: peer,
                    mig: id,
                };
                LazyLink {
                    source: Box::new(source),
                    pushes: prx,
                }
            });
            let me = Arc::clone(agent);
            let pages_in: Box<dyn FnOnce() + Send> = Box::new(move || {
                let _ = me.send(peer, &Msg::PagesIn { mig });
            });
            (links, pages_in)
        });
        let me = Arc::clone(agent);
        thread::spawn(move || {
            let pid = std::cell::Cell::new(None);
            let result = self.restore_and_run(
                &me,
                rx,
                link,
                |p| {
                    lock(&self.incoming).remove(&(peer, mig));
                    lock(&self.hops).insert(
                        p,
                        Hop {
                            home: home.0,
                            mig: home.1,
                            moved_to: None,
                        },
                    );
                    pid.set(Some(p));
                    let _ = me.send(peer, &Msg::MigrateRunning { mig, pid: p });
                },
                |stream, bytes| {
                    if let Some(bytes) = bytes {
                        self.to_home(&me, home, FromAway::Output(stream, bytes));
                    }
                },
            );
            lock(&self.incoming).remove(&(peer, mig));
            if result.is_err() {
                let mut pushes = lock(&self.pushes);
                for id in lock(&links_made).iter() {
                    pushes.remove(&(peer, *id));
                }
            }
            let hop = pid.get().and_then(|p| lock(&self.hops).remove(&p));
            match result {
                Ok(status) => {
                    // Everything it wrote here has gone (the pumps ended).
                    let end = match hop.and_then(|h| h.moved_to) {
                        Some(to) => FromAway::Away(to),
                        None => FromAway::Exit(status),
                    };
                    self.to_home(&me, home, end);
                }
                Err(e) => {
                    let _ = me.send(
                        peer,
                        &Msg::MigrateFailed {
                            mig,
                            message: crate::error_text(&e),
                        },
                    );
                }
            }
        });
    }

    /// Restores the image `peer` sends for its request `req`, answering like
    /// an exec: `Started`, `Data`/`Eof`, `Exited`.
    fn restore_for(self: Arc<Self>, agent: &Arc<Agent>, peer: u16, req: u32) {
        let (tx, rx) = bounded(64);
        lock(&self.restores).insert((peer, req), tx);
        let me = Arc::clone(agent);
        thread::spawn(move || {
            let exec = me.facet::<Exec>();
            let result = self.restore_and_run(
                &me,
                rx,
                None,
                |pid| {
                    lock(&self.restores).remove(&(peer, req));
                    exec.set_running(peer, req, Some(pid));
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
            lock(&self.restores).remove(&(peer, req));
            exec.set_running(peer, req, None);
            let _ = match result {
                Ok(status) => me.send(peer, &Msg::Exited { req, status }),
                Err(e) => me.send(
                    peer,
                    &Msg::Failed {
                        req,
                        message: crate::error_text(&e),
                    },
                ),
            };
        });
    }
}

fn feed(map: &Mutex<HashMap<(u16, u32), Sender<Piece>>>, key: (u16, u32), p: Piece) {
    let tx = lock(map).get(&key).cloned();
    if let Some(tx) = tx {
        // A full channel means the restore stalled: wait (backpressure).
        let _ = tx.send(p);
    }
}

/// Pages fetched over the link from the origin (lazy mode's destination).
struct RingSource {
    agent: Arc<Agent>,
    origin: u16,
    mig: u32,
}

impl PageSource for RingSource {
    fn fetch(&mut self, addr: u64, out: &mut [u8], deadline: Instant) -> Result<(), SourceError> {
        let t = self.agent.facet::<Migration>();
        // Ids start at 1: 0 marks background pushes.
        let id = t.next_fetch.fetch_add(1, Ordering::Relaxed) | 1;
        let (tx, rx) = bounded(1);
        lock(&t.fetches).insert((self.origin, self.mig, id), tx);
        let len =
            u32::try_from(out.len()).map_err(|_| SourceError::Refused("fetch too large".into()))?;
        let sent = self.agent.send(
            self.origin,
            &Msg::PageFetch {
                mig: self.mig,
                id,
                addr,
                len,
            },
        );
        if sent.is_err() {
            lock(&t.fetches).remove(&(self.origin, self.mig, id));
            return Err(SourceError::Disconnected);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(bytes)) if bytes.len() == out.len() => {
                out.copy_from_slice(&bytes);
                Ok(())
            }
            Ok(Ok(bytes)) => Err(SourceError::Refused(format!(
                "asked for {} bytes, got {}",
                out.len(),
                bytes.len()
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                lock(&t.fetches).remove(&(self.origin, self.mig, id));
                Err(SourceError::Timeout(left))
            }
        }
    }
}

/// What keeps a process from being restored here: no time namespaces, and
/// each of `paths` that cannot be opened as the kind it is on the origin
/// (`devices[i]`: a character device, else a regular file).
fn probe_restore(paths: &[String], devices: &[bool]) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut problems = Vec::new();
    if !std::path::Path::new("/proc/self/timens_offsets").exists() {
        problems.push(
            "this kernel has no time namespaces (CONFIG_TIME_NS), so the process's clocks would jump"
                .to_string(),
        );
    }
    let files = paths.iter().enumerate().filter_map(|(i, p)| {
        let device = devices.get(i).copied().unwrap_or(false);
        let why = match std::fs::metadata(p) {
            Err(e) => e.to_string(),
            Ok(m) if device && !m.file_type().is_char_device() => {
                "not a character device".to_string()
            }
            Ok(m) if !device && !m.is_file() => "not a regular file".to_string(),
            Ok(_) => return None,
        };
        Some(format!("{p}: {why}"))
    });
    problems.extend(files);
    problems
}

#[cfg(test)]
mod tests {
    use super::probe_restore;

    #[test]
    fn the_restore_probe_names_each_file_that_would_fail() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let s = |p: &std::path::Path| p.display().to_string();
        let paths = [
            s(&file),
            s(&dir.path().join("missing")),
            s(dir.path()),
            "/dev/null".to_string(),
            s(&file),
        ];
        let problems = probe_restore(&paths, &[false, false, false, true, true]);
        // This kernel has time namespaces: only the files are named.
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!("{}: ", paths[1])),
            "{problems:?}"
        );
        assert!(problems[1].ends_with("not a regular file"), "{problems:?}");
        assert!(
            problems[2].ends_with("not a character device"),
            "{problems:?}"
        );
    }
}
