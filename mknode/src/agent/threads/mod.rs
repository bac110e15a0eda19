//! The threads facet: one thread of a process moves to another kernel while
//! its siblings stay, all in one address space (`crate::migrate::split`),
//! and back.
//!
//! The *origin* (the kernel where the process began) drives every move of
//! its threads and keeps the table of where each one is. A move out parks
//! the thread and sends its shadow image to the destination
//! (`ShadowStart`, then `ThreadImage` pieces, an empty one last), which
//! restores the shadow process and answers `ShadowStarted`. A move back
//! asks the destination for the shadow's state (`ShadowStop` →
//! `ShadowStopped`) and loads it into the parked thread. A move from one
//! destination to another goes through the origin. One move at a time per
//! agent; on any failure the thread runs on where it was.
//!
//! Ends: a shadow that ends by itself is reported to the origin
//! (`ShadowEnded`): an exit ends its parked thread there with the same
//! code (a joiner wakes), a signal kills the whole process. When the
//! process ends at the origin, every shadow is killed (`ShadowKill`). A
//! kernel that goes down takes the process with it: the origin kills a
//! process whose thread was there (its pages may have lived there), a
//! destination kills the shadows of an origin that went down. What a
//! shadow writes on stdout/stderr goes to the process's own
//! (`ShadowOutput`). Futexes: the process's kernel serves every `futex`
//! call of the process and of its shadows ([`futex`]).

mod futex;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use super::dsm::Dsm;
use super::migration::{dev_null, pipe, wait_pid, ChunkWriter, Migration, Piece, PieceReader};
use super::{lock, Agent, AgentError, AgentRef, Facet, Peer};
use crate::dsm::DsmError;
use crate::migrate::split::{self, Answer, SelfMove, SplitError};
use crate::migrate::{self, RestoreError, StdioPlan};
use crate::wire::{AwayThread, ExitStatus, Kind, Msg, Stream, MAX_CHUNK};

/// How long the origin waits for a destination's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// A process of this kernel with threads away.
#[derive(Debug, Default)]
struct Split {
    /// Where its parked threads loop.
    park: Option<u64>,
    /// Thread → (the kernel it runs on, its shadow's pid there).
    away: HashMap<u32, (u16, u32)>,
    /// Its own stdout and stderr, for what its shadows write.
    out: Option<File>,
    err: Option<File>,
    /// The home of its futexes (from its first move on).
    futex: Option<Arc<Home>>,
}

/// A split process's futex server and the listener of its own threads'
/// calls.
#[derive(Debug)]
struct Home {
    server: futex::Server,
    listener: OwnedFd,
}

/// A shadow running here.
#[derive(Debug)]
struct Shadow {
    origin: u16,
    /// The process and thread it stands for, at the origin.
    pid: u32,
    tid: u32,
    /// Ended on purpose (a move back, a kill): nothing to report.
    stopping: bool,
}

/// See the module doc.
pub struct Threads {
    agent: AgentRef,
    procs: Mutex<HashMap<u32, Split>>,
    shadows: Mutex<HashMap<u32, Shadow>>,
    /// Shadow images arriving, by `(origin, req)`.
    starts: Mutex<HashMap<(u16, u32), Sender<Piece>>>,
    /// Shadows being restored, not yet in `shadows`: their thread may
    /// already run and ask to move (see [`Threads::shadow_of`]).
    restoring: Mutex<usize>,
    restored: std::sync::Condvar,
    moving: Mutex<()>,
}

impl std::fmt::Debug for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Threads")
    }
}

/// Where a moved thread runs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadReport {
    /// The kernel (endpoint) it runs on.
    pub at: u16,
    /// Its shadow's pid there; 0 when it is back at the origin.
    pub shadow_pid: u32,
    /// How long the thread was stopped.
    pub downtime: Duration,
}

/// A thread move did not happen; unless said otherwise the thread runs on
/// where it was.
#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    #[error("thread {tid} of process {pid} runs on {at} already")]
    Already { pid: u32, tid: u32, at: Peer },
    #[error(transparent)]
    Split(#[from] SplitError),
    #[error("sending the thread to {peer}")]
    Send {
        peer: Peer,
        #[source]
        source: io::Error,
    },
    #[error("{peer} could not run the thread: {message}; it runs on where it was")]
    Refused { peer: Peer, message: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("{message}")]
    Other { message: String },
    #[error("the thread could not be put back ({0}); its process was killed")]
    Lost(String),
}

impl Threads {
    pub fn new(agent: AgentRef) -> Self {
        Threads {
            agent,
            procs: Mutex::new(HashMap::new()),
            shadows: Mutex::new(HashMap::new()),
            starts: Mutex::new(HashMap::new()),
            restoring: Mutex::new(0),
            restored: std::sync::Condvar::new(),
            moving: Mutex::new(()),
        }
    }

    /// Where thread `tid` of this kernel's process `pid` runs: `None` at
    /// home.
    pub fn whereabouts(&self, pid: u32, tid: u32) -> Option<(u16, u32)> {
        lock(&self.procs)
            .get(&pid)
            .and_then(|s| s.away.get(&tid).copied())
    }

    /// Moves thread `tid` of this kernel's process `pid` to kernel `to`
    /// (home when `to` is this kernel). `self_move`: the thread asked for
    /// it and waits for the answer where it runs now (see
    /// [`split::SelfMove`]).
    pub fn move_thread(
        self: &Arc<Self>,
        pid: u32,
        tid: u32,
        to: u16,
        self_move: Option<SelfMove>,
    ) -> Result<ThreadReport, ThreadError> {
        let agent = self.agent.get()?;
        let _one = lock(&self.moving);
        let me = agent.id();
        let already = |at| ThreadError::Already {
            pid,
            tid,
            at: agent.peer(at),
        };
        let path = agent.facet::<Dsm>().local_path();
        let answer = |status, kernel, buf| {
            path.as_deref().map(|path| Answer {
                path,
                kernel,
                buf,
                status,
            })
        };
        if to != me {
            // Before anything stops (the first move changes the process for
            // good: its memory shared, its futexes served here): a kernel
            // this one is not linked to (ENOENT), or that could not run the
            // thread: the process's files, a CPU without what its code was
            // picked for (another kernel build is fine: the shadow's restore
            // redirects the vDSO as a process's does).
            agent.link(to)?;
            agent
                .facet::<Migration>()
                .restorable_there(&agent, to, &[pid as i32])
                .map_err(|e| ThreadError::Other {
                    message: crate::error_text(&e)
                        .replace("the original runs on", "the thread runs on where it is")
                        .replace(
                            "--any-cpu moves one that uses none",
                            "--any-cpu moves such a process; a thread's move is always checked: \
                             a thread goes only where its process could start",
                        ),
                })?;
        }
        let t0 = Instant::now();
        let (image, park) = match self.whereabouts(pid, tid) {
            Some((at, _)) if at == to => return Err(already(at)),
            None if to == me => return Err(already(me)),
            Some((at, shadow)) => {
                // Its state, from where it runs; the shadow ends there.
                let state = self.take_back(&agent, pid, tid, at, shadow, self_move)?;
                let park = self.park_of(pid)?;
                if to == me {
                    let a = self_move.and_then(|m| answer(0, me, m.buf));
                    self.put_back(pid, tid, park, &state, a)?;
                    log::info!(
                        "threads: thread {tid} of {pid} is back from {}",
                        agent.peer(at)
                    );
                    return Ok(ThreadReport {
                        at: me,
                        shadow_pid: 0,
                        downtime: t0.elapsed(),
                    });
                }
                match split::reshadow(pid as i32, tid as i32, &state) {
                    Ok(image) => (image, park),
                    Err(e) => {
                        let a = self_move.and_then(|m| answer(-libc::EIO, me, m.buf));
                        self.put_back(pid, tid, park, &state, a)?;
                        return Err(e.into());
                    }
                }
            }
            None => {
                let dsm = agent.facet::<Dsm>();
                let left = retry_until_waiting(|| {
                    let park = lock(&self.procs).get(&pid).and_then(|s| s.park);
                    split::leave(pid as i32, tid as i32, me, park, &*dsm, self_move)
                })?;
                self.adopt(pid, left.park);
                if let Some(listener) = left.futex_listener {
                    self.serve_futexes(&agent, pid, listener);
                }
                (left.image, left.park)
            }
        };
        let t_left = t0.elapsed();
        let started = self.start_shadow(&agent, to, pid, tid, &image, self_move.map(|m| m.buf));
        log::debug!(
            "threads: {pid}/{tid}: left in {t_left:?}, shadow started in {:?}, image {} bytes",
            t0.elapsed() - t_left,
            image.len()
        );
        match started {
            Ok(shadow) => {
                if let Some(s) = lock(&self.procs).get_mut(&pid) {
                    s.away.insert(tid, (to, shadow));
                }
                log::info!(
                    "threads: thread {tid} of {pid} runs on {} as {shadow}",
                    agent.peer(to)
                );
                Ok(ThreadReport {
                    at: to,
                    shadow_pid: shadow,
                    downtime: t0.elapsed(),
                })
            }
            Err(e) => {
                // Home again, with the failure as its answer.
                let a = self_move.and_then(|m| answer(-e.errno(), me, m.buf));
                self.put_back(pid, tid, park, &image, a)?;
                Err(e)
            }
        }
    }

    fn park_of(&self, pid: u32) -> Result<u64, ThreadError> {
        lock(&self.procs)
            .get(&pid)
            .and_then(|s| s.park)
            .ok_or_else(|| ThreadError::Lost("no parked thread".into()))
    }

    /// Loads `image`'s thread state into the parked thread; if even that
    /// fails the process cannot go on and is killed.
    fn put_back(
        &self,
        pid: u32,
        tid: u32,
        park: u64,
        image: &[u8],
        answer: Option<Answer<'_>>,
    ) -> Result<(), ThreadError> {
        split::arrive(pid as i32, tid as i32, park, image, answer).map_err(|e| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            ThreadError::Lost(crate::error_text(&e))
        })
    }

    /// Notes `pid` as split (parked threads at `park`); the first time,
    /// opens its stdout/stderr and watches for its end.
    fn adopt(self: &Arc<Self>, pid: u32, park: u64) {
        let mut procs = lock(&self.procs);
        if let Some(s) = procs.get_mut(&pid) {
            s.park = Some(park);
            return;
        }
        let open = |fd: u32| {
            File::options()
                .append(true)
                .open(format!("/proc/{pid}/fd/{fd}"))
                .ok()
        };
        procs.insert(
            pid,
            Split {
                park: Some(park),
                away: HashMap::new(),
                out: open(1),
                err: open(2),
                futex: None,
            },
        );
        drop(procs);
        let me = Arc::clone(self);
        thread::spawn(move || {
            migrate::wait_exit(nix::unistd::Pid::from_raw(pid as i32));
            me.process_ended(pid);
        });
    }

    /// Serves the futexes of split process `pid` (its threads' calls come
    /// on `listener`, other kernels' as `FutexCall`), until it ends.
    fn serve_futexes(&self, agent: &Arc<Agent>, pid: u32, listener: OwnedFd) {
        let home = Arc::new(Home {
            server: futex::Server::new(pid as i32),
            listener,
        });
        if let Some(s) = lock(&self.procs).get_mut(&pid) {
            s.futex = Some(Arc::clone(&home));
        }
        let me = Arc::clone(agent);
        thread::spawn(move || {
            let mut last = Instant::now();
            loop {
                let mut fds = [nix::poll::PollFd::new(
                    home.listener.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(20u16));
                let ev = fds[0].revents().unwrap_or(nix::poll::PollFlags::empty());
                if ev.contains(nix::poll::PollFlags::POLLIN) {
                    if let Ok(c) = futex::recv(&home.listener) {
                        let a = home.server.call(futex::Caller::Local(c.id), c.args);
                        deliver(&me, &home, a);
                    }
                } else if ev
                    .intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR)
                    || matches!(n, Err(e) if e != nix::errno::Errno::EINTR)
                {
                    return;
                }
                if last.elapsed() >= futex::RECHECK {
                    last = Instant::now();
                    let a = home.server.recheck(|c| match c {
                        futex::Caller::Local(id) => !futex::still_waits(&home.listener, id),
                        futex::Caller::Remote { .. } => false,
                    });
                    deliver(&me, &home, a);
                }
            }
        });
    }

    /// The split process `pid` ended here: its shadows go.
    fn process_ended(&self, pid: u32) {
        let Some(s) = lock(&self.procs).remove(&pid) else {
            return;
        };
        let Ok(agent) = self.agent.get() else { return };
        for (tid, (at, shadow)) in s.away {
            log::info!(
                "threads: process {pid} ended; its thread {tid} on {} goes",
                agent.peer(at)
            );
            let _ = agent.send(at, &Msg::ShadowKill { pid: shadow });
        }
        agent.facet::<Dsm>().process_gone(pid as i32);
    }

    fn start_shadow(
        &self,
        agent: &Arc<Agent>,
        to: u16,
        pid: u32,
        tid: u32,
        image: &[u8],
        reply_buf: Option<u64>,
    ) -> Result<u32, ThreadError> {
        let reply_buf = reply_buf.unwrap_or(0);
        let (req, rx) = agent.request(to, |req| Msg::ShadowStart {
            req,
            pid,
            tid,
            reply_buf,
        })?;
        let sent = (|| -> io::Result<()> {
            let mut w = ChunkWriter::new(agent, to, |bytes| Msg::ThreadImage { req, bytes });
            w.write_all(image)?;
            w.flush()?;
            agent
                .send(to, &Msg::ThreadImage { req, bytes: vec![] })
                .map_err(io::Error::other)
        })();
        if let Err(source) = sent {
            agent.forget(to, req);
            return Err(ThreadError::Send {
                peer: agent.peer(to),
                source,
            });
        }
        let answer = rx.recv_timeout(ANSWER_TIMEOUT);
        agent.forget(to, req);
        match answer {
            Ok(Msg::ShadowStarted { pid, .. }) => Ok(pid),
            Ok(Msg::Failed { message, .. }) => Err(ThreadError::Refused {
                peer: agent.peer(to),
                message,
            }),
            Ok(other) => Err(AgentError::Unexpected {
                peer: agent.peer(to),
                got: other.kind().name().to_string(),
            }
            .into()),
            Err(_) => Err(AgentError::NoAnswer {
                peer: agent.peer(to),
                timeout: ANSWER_TIMEOUT,
            }
            .into()),
        }
    }

    /// The state of thread `tid` of `pid`, running on `at` in `shadow`;
    /// the shadow ends there.
    fn take_back(
        &self,
        agent: &Arc<Agent>,
        pid: u32,
        tid: u32,
        at: u16,
        shadow: u32,
        self_move: Option<SelfMove>,
    ) -> Result<Vec<u8>, ThreadError> {
        let (reply_fd, reply_buf) = self_move.map_or((-1, 0), |m| (m.fd, m.buf));
        let image = agent.call_for(
            at,
            ANSWER_TIMEOUT,
            |req| Msg::ShadowStop {
                req,
                pid: shadow,
                reply_fd,
                reply_buf,
            },
            |m| match m {
                Msg::ShadowStopped { image, .. } => Some(image),
                _ => None,
            },
        )?;
        if let Some(s) = lock(&self.procs).get_mut(&pid) {
            s.away.remove(&tid);
        }
        Ok(image)
    }

    /// Destination: a shadow image from `origin` begins.
    fn shadow_start(
        self: Arc<Self>,
        agent: &Arc<Agent>,
        origin: u16,
        req: u32,
        (pid, tid, reply_buf): (u32, u32, u64),
    ) {
        let (tx, rx) = bounded(64);
        lock(&self.starts).insert((origin, req), tx);
        let me = Arc::clone(agent);
        thread::spawn(move || {
            let r = self.run_shadow(
                &me,
                origin,
                req,
                (pid, tid, reply_buf),
                PieceReader::new(rx),
            );
            lock(&self.starts).remove(&(origin, req));
            if let Err(e) = r {
                let _ = me.send(
                    origin,
                    &Msg::Failed {
                        req,
                        message: crate::error_text(&e),
                    },
                );
            }
        });
    }

    /// Restores the shadow, says so, forwards its output, and reports its
    /// end unless it was ended on purpose.
    fn run_shadow(
        &self,
        agent: &Arc<Agent>,
        origin: u16,
        req: u32,
        (pid, tid, reply_buf): (u32, u32, u64),
        image: PieceReader,
    ) -> Result<(), RestoreError> {
        let pipes = |source| RestoreError::Local {
            what: "the shadow's stdio",
            source,
        };
        let (out_r, out_w) = pipe().map_err(pipes)?;
        let (err_r, err_w) = pipe().map_err(pipes)?;
        let plan = StdioPlan {
            stdin: dev_null().map_err(pipes)?,
            stdout: out_w,
            stderr: err_w,
        };
        let dsm = agent.facet::<Dsm>();
        let path = dsm.local_path();
        let answer = match (&path, reply_buf) {
            (_, 0) => None,
            (Some(path), buf) => Some(Answer {
                path,
                kernel: agent.id(),
                buf,
                status: 0,
            }),
            (None, _) => {
                return Err(RestoreError::Dsm(DsmError::Unsupported(
                    "a local socket served by this kernel's agent (for the moved thread)",
                )))
            }
        };
        // The thread runs once restored, before the shadow is recorded
        // below: until then, its own move request waits (`shadow_of`).
        let restoring = Restoring::new(self);
        let (r, listener) = migrate::restore_shadow(image, plan, &*dsm, answer)?;
        forward_futexes(agent, origin, (pid, tid), listener);
        let shadow = u32::try_from(r.pid).unwrap_or(0);
        lock(&self.shadows).insert(
            shadow,
            Shadow {
                origin,
                pid,
                tid,
                stopping: false,
            },
        );
        drop(restoring);
        let _ = agent.send(origin, &Msg::ShadowStarted { req, pid: shadow });
        let status = thread::scope(|s| {
            for (stream, mut r) in [(Stream::Stdout, out_r), (Stream::Stderr, err_r)] {
                s.spawn(move || {
                    let mut buf = vec![0u8; MAX_CHUNK];
                    while let Ok(n @ 1..) = r.read(&mut buf) {
                        let bytes = buf[..n].to_vec();
                        let _ = agent.send(origin, &Msg::ShadowOutput { pid, stream, bytes });
                    }
                });
            }
            migrate::wait_exit(nix::unistd::Pid::from_raw(r.pid));
            wait_pid(shadow)
        });
        dsm.release(r.pid);
        let gone = lock(&self.shadows).remove(&shadow);
        if let Some(sh) = gone.filter(|s| !s.stopping) {
            log::info!("threads: shadow {shadow} of {pid}/{tid} ended: {status:?}");
            let _ = agent.send(
                origin,
                &Msg::ShadowEnded {
                    pid: sh.pid,
                    tid: sh.tid,
                    status,
                },
            );
        }
        Ok(())
    }

    /// Destination: the origin takes shadow `pid`'s thread back.
    fn shadow_stop(
        &self,
        origin: u16,
        pid: u32,
        self_move: Option<SelfMove>,
    ) -> Result<Vec<u8>, ThreadError> {
        match lock(&self.shadows).get_mut(&pid) {
            Some(s) if s.origin == origin => s.stopping = true,
            _ => {
                return Err(ThreadError::Lost(format!(
                    "no shadow {pid} of that kernel runs here"
                )))
            }
        }
        retry_until_waiting(|| split::depart(pid as i32, self_move)).map_err(|e| {
            if let Some(s) = lock(&self.shadows).get_mut(&pid) {
                s.stopping = false;
            }
            e.into()
        })
    }

    /// Origin: the shadow of thread `tid` (on `from`) called
    /// `exit_group(code)`: its parked twin calls it here, and the process's
    /// end takes its shadows.
    fn exit_group(&self, from: u16, pid: u32, tid: u32, code: i32) {
        let _one = lock(&self.moving);
        let park = {
            let procs = lock(&self.procs);
            let Some(s) = procs.get(&pid) else { return };
            if s.away.get(&tid).map(|a| a.0) != Some(from) {
                return;
            }
            s.park
        };
        log::info!(
            "threads: thread {tid} of {pid} called exit_group({code}) away: the process ends"
        );
        let ended = park
            .ok_or_else(|| "no parked thread".to_string())
            .and_then(|park| {
                split::end_parked(pid as i32, tid as i32, park, code, true)
                    .map_err(|e| crate::error_text(&e))
            });
        if let Err(e) = ended {
            log::warn!("threads: ending {pid} with code {code}: {e}; killed");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Origin: a shadow ended by itself.
    fn shadow_ended(&self, from: u16, pid: u32, tid: u32, status: ExitStatus) {
        // Not while a move freezes the process (both stop its threads).
        let _one = lock(&self.moving);
        let park = {
            let mut procs = lock(&self.procs);
            let Some(s) = procs.get_mut(&pid) else { return };
            if s.away.get(&tid).map(|a| a.0) != Some(from) {
                return;
            }
            s.away.remove(&tid);
            s.park
        };
        let p = nix::unistd::Pid::from_raw(pid as i32);
        match (status, park) {
            (ExitStatus::Code(c), Some(park)) => {
                if let Err(e) = split::end_parked(pid as i32, tid as i32, park, c, false) {
                    log::warn!(
                        "threads: ending thread {tid} of {pid}: {}",
                        crate::error_text(&e)
                    );
                    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
                }
            }
            _ => {
                log::info!(
                    "threads: thread {tid} of {pid} was killed away ({status:?}): the process goes"
                );
                let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    fn shadow_output(&self, pid: u32, stream: Stream, bytes: &[u8]) {
        let mut procs = lock(&self.procs);
        let Some(s) = procs.get_mut(&pid) else { return };
        let f = match stream {
            Stream::Stdout => s.out.as_mut(),
            _ => s.err.as_mut(),
        };
        if let Some(f) = f {
            let _ = f.write_all(bytes);
        }
    }
}

/// Gives the answers of a futex home: to its process's threads on its
/// listener, to other kernels' as `FutexDone`.
fn deliver(agent: &Agent, home: &Home, answers: futex::Answers) {
    for (caller, ret) in answers {
        match caller {
            futex::Caller::Local(id) => {
                // Gone meanwhile (interrupted by a signal): nothing to do.
                let _ = futex::respond(&home.listener, id, ret);
            }
            futex::Caller::Remote { node, req } => {
                let _ = agent.post(
                    node,
                    &Msg::FutexDone {
                        req,
                        ret: ret as u64,
                    },
                );
            }
        }
    }
}

/// A shadow's futex calls go to its process's kernel; each waits there on
/// a thread of its own (a wait may last), until the shadow ends. Its
/// `exit_group` goes there too: the process ends everywhere.
fn forward_futexes(agent: &Arc<Agent>, origin: u16, (pid, tid): (u32, u32), listener: OwnedFd) {
    let listener = Arc::new(listener);
    let agent = Arc::clone(agent);
    thread::spawn(move || loop {
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
            Ok(_) => {}
        }
        let ev = fds[0].revents().unwrap_or(nix::poll::PollFlags::empty());
        if !ev.contains(nix::poll::PollFlags::POLLIN) {
            return;
        }
        let Ok(c) = futex::recv(&listener) else {
            continue;
        };
        if c.nr == libc::SYS_exit_group {
            // The whole process ends: its kernel makes it so (and then
            // kills this shadow, which waits here unanswered).
            let code = c.args[0] as i32;
            let _ = agent.send(origin, &Msg::ShadowExitGroup { pid, tid, code });
            continue;
        }
        let (agent, listener) = (Arc::clone(&agent), Arc::clone(&listener));
        thread::spawn(move || {
            let ret = match agent.request(origin, |req| Msg::FutexCall {
                req,
                pid,
                args: c.args.to_vec(),
            }) {
                Ok((req, rx)) => {
                    let r = match rx.recv() {
                        Ok(Msg::FutexDone { ret, .. }) => ret as i64,
                        _ => -i64::from(libc::EIO),
                    };
                    agent.forget(origin, req);
                    r
                }
                Err(_) => -i64::from(libc::EIO),
            };
            let _ = futex::respond(&listener, c.id, ret);
        });
    });
}

/// Runs a freeze that needs the thread waiting for its answer, again until
/// it is (it sent its request a moment before it began to wait).
fn retry_until_waiting<T>(mut f: impl FnMut() -> Result<T, SplitError>) -> Result<T, SplitError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match f() {
            Err(SplitError::NotWaiting { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1));
            }
            r => return r,
        }
    }
}

impl ThreadError {
    /// The errno `mk_migrate()` reports for it.
    pub fn errno(&self) -> i32 {
        match self {
            ThreadError::Already { .. } => libc::EALREADY,
            ThreadError::Agent(AgentError::NoLink(_)) => libc::ENOENT,
            ThreadError::Agent(AgentError::NoAnswer { .. }) => libc::ETIMEDOUT,
            _ => libc::EIO,
        }
    }
}

impl Threads {
    /// Every thread of this kernel's processes that runs elsewhere, by
    /// process and thread.
    pub fn away(&self) -> Vec<AwayThread> {
        let mut v: Vec<AwayThread> = lock(&self.procs)
            .iter()
            .flat_map(|(pid, s)| {
                s.away.iter().map(|(tid, (at, shadow))| AwayThread {
                    pid: *pid,
                    tid: *tid,
                    at: *at,
                    shadow_pid: *shadow,
                })
            })
            .collect();
        v.sort_by_key(|a| (a.pid, a.tid));
        v
    }

    /// The process and thread a shadow here stands for: `(origin, pid,
    /// tid)`. A process that is none waits first for the shadows being
    /// restored (a thread that asks to move again as soon as it arrived
    /// comes before its shadow is recorded; taken for a process of this
    /// kernel, its move failed).
    pub fn shadow_of(&self, shadow: u32) -> Option<(u16, u32, u32)> {
        let find = || {
            lock(&self.shadows)
                .get(&shadow)
                .map(|s| (s.origin, s.pid, s.tid))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = lock(&self.restoring);
        loop {
            if let Some(s) = find() {
                return Some(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if *n == 0 || left.is_zero() {
                return None;
            }
            n = self
                .restored
                .wait_timeout(n, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Counts a shadow restore under way, until dropped.
struct Restoring<'a>(&'a Threads);

impl<'a> Restoring<'a> {
    fn new(t: &'a Threads) -> Self {
        *lock(&t.restoring) += 1;
        Restoring(t)
    }
}

impl Drop for Restoring<'_> {
    fn drop(&mut self) {
        *lock(&self.0.restoring) -= 1;
        self.0.restored.notify_all();
    }
}

impl Facet for Threads {
    fn kinds(&self) -> &'static [Kind] {
        &[
            Kind::ThreadMove,
            Kind::ShadowStart,
            Kind::ThreadImage,
            Kind::ShadowStop,
            Kind::ShadowEnded,
            Kind::ShadowKill,
            Kind::ShadowOutput,
            Kind::ThreadsList,
            Kind::FutexCall,
            Kind::ShadowExitGroup,
        ]
    }

    fn handle(self: Arc<Self>, agent: &Arc<Agent>, peer: u16, msg: Msg) -> Option<Msg> {
        match msg {
            Msg::ThreadMove {
                req,
                pid,
                tid,
                to,
                reply_fd,
                reply_buf,
            } => agent.answer_later(peer, req, move |_| {
                let m = SelfMove::from_wire(reply_fd, reply_buf);
                self.move_thread(pid, tid, to, m).map(|r| Msg::ThreadMoved {
                    req,
                    at: r.at,
                    shadow_pid: r.shadow_pid,
                    downtime_ns: u64::try_from(r.downtime.as_nanos()).unwrap_or(u64::MAX),
                })
            }),
            Msg::ShadowStart {
                req,
                pid,
                tid,
                reply_buf,
            } => self.shadow_start(agent, peer, req, (pid, tid, reply_buf)),
            Msg::ThreadImage { req, bytes } => {
                let tx = lock(&self.starts).get(&(peer, req)).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(if bytes.is_empty() {
                        Piece::End
                    } else {
                        Piece::Bytes(bytes)
                    });
                }
            }
            Msg::ShadowStop {
                req,
                pid,
                reply_fd,
                reply_buf,
            } => agent.answer_later(peer, req, move |_| {
                let m = SelfMove::from_wire(reply_fd, reply_buf);
                self.shadow_stop(peer, pid, m)
                    .map(|image| Msg::ShadowStopped { req, image })
            }),
            Msg::ShadowExitGroup { pid, tid, code } => {
                thread::spawn(move || self.exit_group(peer, pid, tid, code));
            }
            Msg::ShadowEnded { pid, tid, status } => {
                thread::spawn(move || self.shadow_ended(peer, pid, tid, status));
            }
            Msg::ShadowKill { pid } => {
                let ours = match lock(&self.shadows).get_mut(&pid) {
                    Some(s) if s.origin == peer => {
                        s.stopping = true;
                        true
                    }
                    _ => false,
                };
                if ours {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            Msg::ShadowOutput { pid, stream, bytes } => self.shadow_output(pid, stream, &bytes),
            Msg::FutexCall { req, pid, args } => {
                let home = lock(&self.procs).get(&pid).and_then(|s| s.futex.clone());
                let caller = futex::Caller::Remote { node: peer, req };
                match (home, <[u64; 6]>::try_from(args)) {
                    (Some(home), Ok(args)) => {
                        // Off the receive thread: reading the word may be
                        // a DSM fault whose answer comes on this very link.
                        let agent = Arc::clone(agent);
                        thread::spawn(move || {
                            let a = home.server.call(caller, args);
                            deliver(&agent, &home, a);
                        });
                    }
                    (home, _) => {
                        let e = if home.is_some() {
                            libc::EINVAL
                        } else {
                            libc::ESRCH
                        };
                        let _ = agent.send(
                            peer,
                            &Msg::FutexDone {
                                req,
                                ret: (-i64::from(e)) as u64,
                            },
                        );
                    }
                }
            }
            Msg::ThreadsList { req } => {
                let _ = agent.send(
                    peer,
                    &Msg::ThreadsListed {
                        req,
                        away: self.away(),
                    },
                );
            }
            other => return Some(other),
        }
        None
    }

    fn peer_lost(&self, peer: u16, why: &str) {
        for s in lock(&self.procs).values() {
            if let Some(h) = &s.futex {
                h.server.forget_node(peer);
            }
        }
        // Origin: a process with a thread there cannot go on.
        let doomed: Vec<u32> = lock(&self.procs)
            .iter()
            .filter(|(_, s)| s.away.values().any(|(at, _)| *at == peer))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in doomed {
            log::warn!(
                "threads: process {pid} had a thread on endpoint {peer}, which {why}: killed"
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Destination: the shadows of a process whose origin went down.
        for (shadow, s) in lock(&self.shadows).iter_mut() {
            if s.origin == peer {
                s.stopping = true;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*shadow as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
