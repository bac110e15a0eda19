//! The agent: serves requests that arrive on its links and routes the
//! answers to requests it sent. The same code runs in the host daemon
//! (endpoint 0) and in every guest's `guest-init`, so every kernel can ask
//! every other one the same things.
//!
//! One receive thread per link decodes frames and dispatches them; long work
//! (a command's output, a ping series, a traffic burst) runs on its own
//! thread so a link is never blocked by one request. A frame that does not
//! decode is counted and dropped: the peer is untrusted, the agent survives.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::link::{Link, LinkError};
use crate::wire::{self, ExecRequest, ExitStatus, KernelInfo, Msg, Stream, MAX_CHUNK};

/// How long a send may wait for room before the peer is given up on.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one ping may take before it counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer whose link has reported it dead (no heartbeat for the ring's
/// `dead_after`, 2 s) this much longer is taken as lost: what waits on it
/// fails. One that detached is lost at once.
const PEER_LOST_AFTER: Duration = Duration::from_secs(3);

/// What the embedding program provides.
pub struct Hooks {
    /// Power the kernel off (guest-init), or ignore (host).
    pub power_off: Box<dyn Fn() + Send + Sync>,
    /// Describe this kernel.
    pub info: Box<dyn Fn() -> KernelInfo + Send + Sync>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct BlobStats {
    good: u64,
    bad: u64,
    next_seq: u64,
}

#[derive(Debug)]
struct LinkEntry {
    link: Arc<dyn Link>,
    /// Tells this link's receive thread to stop.
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct ExecState {
    pid: u32,
    stdin: Option<Sender<Option<Vec<u8>>>>,
}

/// One agent, with its links.
#[derive(Debug)]
pub struct Agent {
    id: u16,
    /// Instance names by endpoint id, for messages (`host` for 0).
    names: RwLock<HashMap<u16, String>>,
    links: RwLock<HashMap<u16, LinkEntry>>,
    next_req: AtomicU32,
    next_ping: AtomicU64,
    /// Answers to our requests, by (peer, req).
    pending: Mutex<HashMap<(u16, u32), Sender<Msg>>>,
    /// Commands we run for a peer, by (peer, their req).
    execs: Mutex<HashMap<(u16, u32), ExecState>>,
    /// Processes of ours that moved to another kernel: their real exit
    /// status arrives from there (by pid).
    moved: Mutex<HashMap<u32, Receiver<Result<ExitStatus, String>>>>,
    /// Migrations in flight or forwarding output, by (peer, mig).
    pub(crate) migrations: crate::mover::Table,
    pongs: Mutex<HashMap<(u16, u64), Sender<Instant>>>,
    blobs: Mutex<HashMap<u16, BlobStats>>,
    bad_frames: AtomicU64,
    stop: AtomicBool,
    pub(crate) hooks: Hooks,
}

/// A peer as messages name it: its instance name when this agent was told
/// it ([`Agent::name_peers`]), `endpoint <id>` otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: u16,
    pub name: Option<String>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => f.write_str(n),
            None => write!(f, "endpoint {}", self.id),
        }
    }
}

/// A request could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no link to {0}")]
    NoLink(Peer),
    #[error("link to {peer}")]
    Link {
        peer: Peer,
        #[source]
        source: LinkError,
    },
    #[error("{peer} did not answer within {:.1} s", .timeout.as_secs_f64())]
    NoAnswer { peer: Peer, timeout: Duration },
    #[error("{peer} refused: {message}")]
    Failed { peer: Peer, message: String },
    #[error("{peer} answered with an unexpected {got}")]
    Unexpected { peer: Peer, got: String },
}

impl Agent {
    pub fn new(id: u16, hooks: Hooks) -> Arc<Agent> {
        Arc::new(Agent {
            id,
            names: RwLock::new(HashMap::new()),
            links: RwLock::new(HashMap::new()),
            next_req: AtomicU32::new(1),
            next_ping: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            execs: Mutex::new(HashMap::new()),
            moved: Mutex::new(HashMap::new()),
            migrations: crate::mover::Table::default(),
            pongs: Mutex::new(HashMap::new()),
            blobs: Mutex::new(HashMap::new()),
            bad_frames: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            hooks,
        })
    }

    /// This agent's endpoint id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Tells the agent the instance names of endpoints (this one's too), so
    /// its messages say `beta` rather than `endpoint 2`.
    pub fn name_peers(&self, names: impl IntoIterator<Item = (u16, String)>) {
        self.names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(names);
    }

    /// `id` as messages name it.
    pub fn peer(&self, id: u16) -> Peer {
        Peer {
            id,
            name: self
                .names
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned(),
        }
    }

    /// Frames from peers that did not decode, so far.
    pub fn bad_frames(&self) -> u64 {
        self.bad_frames.load(Ordering::Relaxed)
    }

    /// Adds a link to `peer` and starts serving it (replacing, and
    /// stopping, any link it had to that peer).
    pub fn add_link(self: &Arc<Self>, peer: u16, link: Arc<dyn Link>) {
        self.remove_link(peer);
        let stop = Arc::new(AtomicBool::new(false));
        let me = Arc::clone(self);
        let (l, st) = (Arc::clone(&link), Arc::clone(&stop));
        let thread = thread::Builder::new()
            .name(format!("mknode-rx-{peer}"))
            .spawn(move || me.serve(peer, l, st))
            .expect("spawning a thread");
        self.links
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                peer,
                LinkEntry {
                    link,
                    stop,
                    thread: Some(thread),
                },
            );
    }

    /// Stops serving `peer` and lets go of the link (its receive thread has
    /// exited when this returns, so the transport's halves are free again).
    /// Requests waiting on that peer fail.
    pub fn remove_link(&self, peer: u16) {
        let entry = self
            .links
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
        if let Some(mut e) = entry {
            e.stop.store(true, Ordering::SeqCst);
            if let Some(t) = e.thread.take() {
                if t.thread().id() != thread::current().id() {
                    let _ = t.join();
                }
            }
            self.fail_peer(peer, "the link was removed");
        }
    }

    /// Stops the receive threads (they notice within 100 ms).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn link(&self, peer: u16) -> Result<Arc<dyn Link>, AgentError> {
        self.links
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .map(|e| Arc::clone(&e.link))
            .ok_or_else(|| AgentError::NoLink(self.peer(peer)))
    }

    /// Sends one message to `peer`.
    pub fn send(&self, peer: u16, msg: &Msg) -> Result<(), AgentError> {
        let link = self.link(peer)?;
        link.send(&msg.encode(), SEND_TIMEOUT)
            .map_err(|source| AgentError::Link {
                peer: self.peer(peer),
                source,
            })
    }

    /// Sends a request built around a fresh request id; answers arrive on
    /// the returned channel until a final one (see [`is_final`]).
    pub fn request(
        &self,
        peer: u16,
        build: impl FnOnce(u32) -> Msg,
    ) -> Result<(u32, Receiver<Msg>), AgentError> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((peer, req), tx);
        if let Err(e) = self.send(peer, &build(req)) {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(peer, req));
            return Err(e);
        }
        Ok((req, rx))
    }

    /// Sends a request and waits for its single final answer.
    pub fn call(
        &self,
        peer: u16,
        timeout: Duration,
        build: impl FnOnce(u32) -> Msg,
    ) -> Result<Msg, AgentError> {
        let (req, rx) = self.request(peer, build)?;
        // Progress messages on the way are skipped: the answer is the final one.
        let deadline = std::time::Instant::now() + timeout;
        let r = loop {
            match rx.recv_deadline(deadline) {
                Ok(m) if !is_final(&m) => continue,
                other => break other,
            }
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(peer, req));
        match r {
            Ok(Msg::Failed { message, .. }) => Err(AgentError::Failed {
                peer: self.peer(peer),
                message,
            }),
            Ok(m) => Ok(m),
            Err(_) => Err(AgentError::NoAnswer {
                peer: self.peer(peer),
                timeout,
            }),
        }
    }

    /// Forgets a request (its answers are dropped from now on).
    pub fn forget(&self, peer: u16, req: u32) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(peer, req));
    }

    fn serve(self: Arc<Self>, peer: u16, link: Arc<dyn Link>, stop: Arc<AtomicBool>) {
        let mut buf = Vec::new();
        let mut warned = false;
        // Since when the peer has been down, and whether its requests were
        // failed for it (once per time it goes down).
        let mut down: Option<Instant> = None;
        let mut failed = false;
        while !self.stop.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            let got = link.recv(&mut buf, Duration::from_millis(100));
            if matches!(got, Ok(true)) {
                down = None;
                failed = false;
            }
            match got {
                Ok(false) => continue,
                Err(LinkError::PeerDown {
                    detached, quiet, ..
                }) => {
                    // Silent past the ring's dead threshold, then another
                    // PEER_LOST_AFTER: a guest starved of CPU for a while
                    // under TCG is not lost.
                    let since = *down.get_or_insert_with(Instant::now);
                    if !failed && (detached || since.elapsed() >= PEER_LOST_AFTER) {
                        let who = self.peer(peer);
                        let why = match quiet {
                            Some(q) if !detached => format!(
                                "{who} stopped answering (no heartbeat for {:.1} s)",
                                q.as_secs_f64()
                            ),
                            _ => format!("{who} stopped (it left the shared window)"),
                        };
                        eprintln!("mknode: {why}");
                        self.fail_peer(peer, &why);
                        failed = true;
                    }
                }
                Ok(true) => match Msg::decode(&buf) {
                    Ok(m) => self.handle(peer, m),
                    Err(e) => {
                        self.bad_frames.fetch_add(1, Ordering::Relaxed);
                        if !warned {
                            eprintln!("mknode: bad frame from {}: {e} (further ones are counted, not logged)", self.peer(peer));
                            warned = true;
                        }
                    }
                },
                Err(e) => {
                    eprintln!("mknode: link to {} closed: {e}", self.peer(peer));
                    self.fail_peer(peer, &e.to_string());
                    let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
                    // Only our own entry: a newer link may have replaced it.
                    if links
                        .get(&peer)
                        .is_some_and(|e| Arc::ptr_eq(&e.stop, &stop))
                    {
                        links.remove(&peer);
                    }
                    return;
                }
            }
        }
    }

    /// Every request waiting on `peer` gets a `Failed` answer (the peer is
    /// lost, or stopped).
    pub fn fail_peer(&self, peer: u16, why: &str) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<_> = p.keys().filter(|k| k.0 == peer).copied().collect();
        for k in keys {
            if let Some(tx) = p.remove(&k) {
                let _ = tx.send(Msg::Failed {
                    req: k.1,
                    message: format!("link lost: {why}"),
                });
            }
        }
        drop(p);
        self.migrations.peer_lost(peer, why);
    }

    fn handle(self: &Arc<Self>, peer: u16, m: Msg) {
        let Some(m) = self.handle_migration(peer, m) else {
            return;
        };
        match m {
            Msg::Hello { .. } => {}
            Msg::Ping { seq, t_ns } => {
                let _ = self.send(peer, &Msg::Pong { seq, t_ns });
            }
            Msg::Pong { seq, .. } => {
                if let Some(tx) = self
                    .pongs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(peer, seq))
                {
                    let _ = tx.send(Instant::now());
                }
            }
            Msg::InfoRequest { req } => {
                let info = (self.hooks.info)();
                let _ = self.send(peer, &Msg::Info { req, info });
            }
            Msg::Exec { req, exec } => self.start_exec(peer, req, exec),
            Msg::Data {
                req,
                stream: Stream::Stdin,
                bytes,
            } => self.stdin(peer, req, Some(bytes)),
            Msg::Eof {
                req,
                stream: Stream::Stdin,
            } => self.stdin(peer, req, None),
            Msg::Signal { req, signal } => {
                let pid = self
                    .execs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(peer, req))
                    .map(|e| e.pid);
                if let (Some(pid), Ok(sig)) = (pid, nix::sys::signal::Signal::try_from(signal)) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(-1)),
                        sig,
                    );
                }
            }
            Msg::PowerOff => (self.hooks.power_off)(),
            Msg::PingPeer {
                req,
                peer: target,
                count,
            } => {
                let me = Arc::clone(self);
                thread::spawn(move || {
                    let answer = match me.ping(target, count) {
                        Ok(rtts) => report(req, &rtts),
                        Err(e) => Msg::Failed {
                            req,
                            message: e.to_string(),
                        },
                    };
                    let _ = me.send(peer, &answer);
                });
            }
            Msg::SendBlobs {
                req,
                peer: target,
                count,
                size,
                seed,
            } => {
                let me = Arc::clone(self);
                thread::spawn(move || {
                    let answer = match me.send_blobs(target, count, size, seed) {
                        Ok(()) => Msg::Done { req },
                        Err(e) => Msg::Failed {
                            req,
                            message: e.to_string(),
                        },
                    };
                    let _ = me.send(peer, &answer);
                });
            }
            Msg::Blob {
                seq,
                checksum,
                payload,
            } => {
                let mut b = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
                // A burst starts at sequence 0: forget the previous one.
                if seq == 0 {
                    b.remove(&peer);
                }
                let s = b.entry(peer).or_default();
                if seq == s.next_seq && wire::checksum(&payload) == checksum {
                    s.good += 1;
                } else {
                    s.bad += 1;
                }
                s.next_seq = seq.wrapping_add(1);
            }
            Msg::BlobCheck { req, from } => {
                let s = self.blob_stats(from);
                let _ = self.send(
                    peer,
                    &Msg::BlobReport {
                        req,
                        from,
                        good: s.good,
                        bad: s.bad,
                        next_seq: s.next_seq,
                    },
                );
            }
            // Everything else answers one of our requests.
            other => {
                let Some(req) = other.req() else { return };
                let last = is_final(&other);
                let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(tx) = p.get(&(peer, req)) {
                    let _ = tx.send(other);
                    if last {
                        p.remove(&(peer, req));
                    }
                }
            }
        }
    }

    fn blob_stats(&self, from: u16) -> BlobStats {
        self.blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&from)
            .copied()
            .unwrap_or_default()
    }

    /// Forgets what arrived from `from` (before a new traffic check).
    pub fn reset_blobs(&self, from: u16) {
        self.blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&from);
    }

    /// `(good, bad, next_seq)` of the blobs received from `from`.
    pub fn blob_report(&self, from: u16) -> (u64, u64, u64) {
        let s = self.blob_stats(from);
        (s.good, s.bad, s.next_seq)
    }

    /// Sends `count` checksummed blobs of `size` bytes to `peer`.
    pub fn send_blobs(
        &self,
        peer: u16,
        count: u32,
        size: u32,
        seed: u64,
    ) -> Result<(), AgentError> {
        let link = self.link(peer)?;
        let size = (size as usize).min(link.max_message().saturating_sub(64));
        let mut buf = Vec::new();
        for seq in 0..u64::from(count) {
            let payload = wire::blob_payload(seed, seq, size);
            let m = Msg::Blob {
                seq,
                checksum: wire::checksum(&payload),
                payload,
            };
            buf.clear();
            m.encode_into(&mut buf);
            link.send(&buf, SEND_TIMEOUT)
                .map_err(|source| AgentError::Link {
                    peer: self.peer(peer),
                    source,
                })?;
        }
        Ok(())
    }

    /// Round trips to `peer`, each a `Ping` answered by its agent.
    pub fn ping(&self, peer: u16, count: u32) -> Result<Vec<Duration>, AgentError> {
        let link = self.link(peer)?;
        let mut rtts = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let seq = self.next_ping.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = bounded(1);
            self.pongs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((peer, seq), tx);
            let t0 = Instant::now();
            let m = Msg::Ping { seq, t_ns: 0 };
            link.send(&m.encode(), SEND_TIMEOUT)
                .map_err(|source| AgentError::Link {
                    peer: self.peer(peer),
                    source,
                })?;
            match rx.recv_timeout(PING_TIMEOUT) {
                Ok(t1) => rtts.push(t1.duration_since(t0)),
                Err(_) => {
                    self.pongs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&(peer, seq));
                    return Err(AgentError::NoAnswer {
                        peer: self.peer(peer),
                        timeout: PING_TIMEOUT,
                    });
                }
            }
        }
        Ok(rtts)
    }

    fn stdin(&self, peer: u16, req: u32, bytes: Option<Vec<u8>>) {
        let tx = self
            .execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(peer, req))
            .and_then(|e| e.stdin.clone());
        if let Some(tx) = tx {
            let _ = tx.send(bytes);
        }
    }

    fn start_exec(self: &Arc<Self>, peer: u16, req: u32, exec: ExecRequest) {
        let Some(prog) = exec.argv.first() else {
            let _ = self.send(
                peer,
                &Msg::Failed {
                    req,
                    message: "empty command".into(),
                },
            );
            return;
        };
        let mut cmd = Command::new(prog);
        cmd.args(&exec.argv[1..])
            .envs(exec.env.iter().map(|(k, v)| (k, v)))
            .stdin(if exec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(c) = &exec.cwd {
            cmd.current_dir(c);
        }
        // PID 1 blocks the signals it takes with sigwait, in every thread;
        // a command must start with none blocked, or SIGTERM and SIGINT
        // would not reach it. std does not reset the mask.
        // SAFETY: runs in the forked child before exec; sigprocmask is
        // async-signal-safe, allocates nothing and takes no lock.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::signal::sigprocmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&nix::sys::signal::SigSet::empty()),
                    None,
                )
                .map_err(std::io::Error::from)
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                // As a shell says it: the reason on stderr, and status 127
                // for a command not found, 126 for one that cannot run.
                let code = if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                };
                let text = format!("cannot run {prog}: {}\n", crate::io_error_text(&e));
                let _ = self.send(
                    peer,
                    &Msg::Data {
                        req,
                        stream: Stream::Stderr,
                        bytes: text.into_bytes(),
                    },
                );
                let _ = self.send(
                    peer,
                    &Msg::Exited {
                        req,
                        status: ExitStatus::Code(code),
                    },
                );
                return;
            }
        };
        let pid = child.id();

        let stdin_tx = child.stdin.take().map(|mut stdin| {
            let (tx, rx) = unbounded::<Option<Vec<u8>>>();
            thread::spawn(move || {
                while let Ok(Some(bytes)) = rx.recv() {
                    if stdin.write_all(&bytes).is_err() {
                        break;
                    }
                }
            });
            tx
        });
        self.execs.lock().unwrap_or_else(|e| e.into_inner()).insert(
            (peer, req),
            ExecState {
                pid,
                stdin: stdin_tx,
            },
        );
        let _ = self.send(peer, &Msg::Started { req, pid });

        let me = Arc::clone(self);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        thread::spawn(move || {
            let readers: Vec<_> = [
                (
                    Stream::Stdout,
                    stdout.map(|s| Box::new(s) as Box<dyn Read + Send>),
                ),
                (
                    Stream::Stderr,
                    stderr.map(|s| Box::new(s) as Box<dyn Read + Send>),
                ),
            ]
            .into_iter()
            .filter_map(|(stream, r)| r.map(|r| (stream, r)))
            .map(|(stream, r)| {
                let me = Arc::clone(&me);
                thread::spawn(move || me.pump(peer, req, stream, r))
            })
            .collect();
            // waitpid only once the process has exited (its pidfd says so):
            // from this thread, while a migration thread has the process
            // under ptrace, it would take that thread's ptrace stops. A
            // process killed because it moved away is reaped at once, while
            // its output goes on arriving from the other kernel.
            crate::migrate::wait_exit(nix::unistd::Pid::from_raw(pid as i32));
            let status = match child.wait() {
                Ok(s) => exit_status(s),
                Err(_) => ExitStatus::Code(-1),
            };
            for r in readers {
                let _ = r.join();
            }
            // Killed because it moved to another kernel: its real end is
            // reported from there.
            let end = match me.final_status(pid, status) {
                Ok(status) => Msg::Exited { req, status },
                Err(message) => Msg::Failed { req, message },
            };
            me.execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(peer, req));
            let _ = me.send(peer, &end);
        });
    }

    /// Copies one output stream of a command to `peer` in chunks.
    fn pump(&self, peer: u16, req: u32, stream: Stream, mut r: Box<dyn Read + Send>) {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let m = Msg::Data {
                        req,
                        stream,
                        bytes: buf[..n].to_vec(),
                    };
                    if self.send(peer, &m).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = self.send(peer, &Msg::Eof { req, stream });
    }

    /// Reaps the orphans re-parented to PID 1 (call it from the main
    /// thread on SIGCHLD). Only the calling thread's own children, one by
    /// one: commands and restored processes are children of agent threads,
    /// waited for by pid there, and an orphan being moved or saved is
    /// skipped (see `migrate::reap_orphans`: a wait here would take the
    /// ptrace stop its capture waits for). Returns how many.
    pub fn reap(&self) -> usize {
        crate::migrate::reap_orphans()
    }

    /// Registers `pid` as what request `(peer, req)` runs, so that its
    /// `Signal`s reach it (a restored process, like an exec'd one);
    /// `None` forgets it.
    pub(crate) fn set_running(&self, peer: u16, req: u32, pid: Option<u32>) {
        let mut execs = self.execs.lock().unwrap_or_else(|e| e.into_inner());
        match pid {
            Some(pid) => {
                execs.insert((peer, req), ExecState { pid, stdin: None });
            }
            None => {
                execs.remove(&(peer, req));
            }
        }
    }

    /// Marks `pid` (a process of ours) as moved away: `final_status`
    /// will wait for `rx` instead of trusting the local kill.
    pub(crate) fn mark_moved(&self, pid: u32, rx: Receiver<Result<ExitStatus, String>>) {
        self.moved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, rx);
    }

    /// The exit status to report for `pid`: the local one, unless the
    /// process moved to another kernel, then the one from there (waits);
    /// `Err` when that kernel went down with it.
    pub(crate) fn final_status(&self, pid: u32, local: ExitStatus) -> Result<ExitStatus, String> {
        let rx = self
            .moved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
        match rx {
            Some(rx) => rx.recv().unwrap_or(Ok(local)),
            None => Ok(local),
        }
    }
}

/// True for the answer that ends a request (see the table in `wire.rs`).
pub fn is_final(m: &Msg) -> bool {
    m.is_final()
}

fn exit_status(s: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(sig)) => ExitStatus::Signal(sig),
        (None, None) => ExitStatus::Code(-1),
    }
}

fn report(req: u32, rtts: &[Duration]) -> Msg {
    let mut ns: Vec<u64> = rtts
        .iter()
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .collect();
    ns.sort_unstable();
    Msg::PingReport {
        req,
        count: u32::try_from(ns.len()).unwrap_or(u32::MAX),
        rtt_min_ns: ns.first().copied().unwrap_or(0),
        rtt_median_ns: ns.get(ns.len() / 2).copied().unwrap_or(0),
        rtt_max_ns: ns.last().copied().unwrap_or(0),
    }
}

/// What this kernel looks like, read from /proc and /sys (the default
/// `info` hook for both the host and guests).
pub fn kernel_info() -> KernelInfo {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let uts = nix::sys::utsname::uname().ok();
    let s = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uts.as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut nodes = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let cpus = read(&format!("/sys/devices/system/node/{name}/cpulist"));
            let mem = read(&format!("/sys/devices/system/node/{name}/meminfo"));
            nodes.push(wire::NodeInfo {
                id,
                cpus,
                mem_total: meminfo_kb(&mem, "MemTotal:") * 1024,
            });
        }
    }
    nodes.sort_by_key(|n| n.id);
    let uptime_ms = read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64);
    KernelInfo {
        hostname: s(|u| u.nodename()),
        sysname: s(|u| u.sysname()),
        release: s(|u| u.release()),
        version: s(|u| u.version()),
        machine: s(|u| u.machine()),
        cpus_online: read("/sys/devices/system/cpu/online"),
        nodes,
        mem_total: meminfo_kb(&read("/proc/meminfo"), "MemTotal:") * 1024,
        uptime_ms,
    }
}

/// The kB value of `key` in a meminfo-style text (per-node files prefix
/// lines with "Node N ").
fn meminfo_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let at = l.find(key)?;
            l[at + key.len()..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::MemLink;

    fn pair() -> (Arc<Agent>, Arc<Agent>) {
        let hooks = || Hooks {
            power_off: Box::new(|| {}),
            info: Box::new(kernel_info),
        };
        let a = Agent::new(0, hooks());
        let b = Agent::new(1, hooks());
        let (la, lb) = MemLink::pair(256, 64 * 1024);
        a.add_link(1, Arc::new(la));
        b.add_link(0, Arc::new(lb));
        (a, b)
    }

    /// Runs a command on `peer`, returning (stdout, stderr, status).
    fn run(
        a: &Agent,
        peer: u16,
        argv: &[&str],
        stdin: Option<&[u8]>,
    ) -> (Vec<u8>, Vec<u8>, ExitStatus) {
        let exec = ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: None,
            stdin: stdin.is_some(),
        };
        let (req, rx) = a.request(peer, |req| Msg::Exec { req, exec }).unwrap();
        if let Some(input) = stdin {
            for chunk in input.chunks(1000) {
                a.send(
                    peer,
                    &Msg::Data {
                        req,
                        stream: Stream::Stdin,
                        bytes: chunk.to_vec(),
                    },
                )
                .unwrap();
            }
            a.send(
                peer,
                &Msg::Eof {
                    req,
                    stream: Stream::Stdin,
                },
            )
            .unwrap();
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match rx.recv_timeout(Duration::from_secs(20)).expect("answer") {
                Msg::Started { .. } | Msg::Eof { .. } => {}
                Msg::Data {
                    stream: Stream::Stdout,
                    bytes,
                    ..
                } => out.extend(bytes),
                Msg::Data {
                    stream: Stream::Stderr,
                    bytes,
                    ..
                } => err.extend(bytes),
                Msg::Exited { status, .. } => return (out, err, status),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn errors_name_peers_by_instance_name_once_told() {
        let (a, _b) = pair();
        a.name_peers([(0, "host".to_string()), (7, "gamma".to_string())]);
        let ping = Msg::Ping { seq: 1, t_ns: 0 };
        let e = a.send(7, &ping).unwrap_err();
        assert_eq!(e.to_string(), "no link to gamma");
        let e = a.send(8, &ping).unwrap_err();
        assert_eq!(e.to_string(), "no link to endpoint 8");
    }

    #[test]
    fn exec_streams_and_status() {
        let (a, _b) = pair();
        let (out, err, st) = run(&a, 1, &["sh", "-c", "echo out; echo err >&2; exit 7"], None);
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert_eq!(st, ExitStatus::Code(7));
        // Binary, larger than a chunk, through stdin and back byte-exact.
        let input: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 256) as u8).collect();
        let (out, _, st) = run(&a, 1, &["cat"], Some(&input));
        assert_eq!(st, ExitStatus::Code(0));
        assert_eq!(out, input);
        let (_, _, st) = run(&a, 1, &["sh", "-c", "kill -9 $$"], None);
        assert_eq!(st, ExitStatus::Signal(9));
    }

    #[test]
    fn exec_over_a_shared_memory_ring() {
        let w =
            shmem_ring::Window::anonymous(shmem_ring::Layout::with_capacity(2, 128 << 10).unwrap())
                .unwrap();
        let (e0, e1) = (w.attach(0).unwrap(), w.attach(1).unwrap());
        let hooks = || Hooks {
            power_off: Box::new(|| {}),
            info: Box::new(kernel_info),
        };
        let a = Agent::new(0, hooks());
        let b = Agent::new(1, hooks());
        a.add_link(1, Arc::new(crate::link::RingLink::open(&e0, 1).unwrap()));
        b.add_link(0, Arc::new(crate::link::RingLink::open(&e1, 0).unwrap()));
        // 3 MB through stdin and back: many times the ring's capacity, so
        // flow control across the ring is exercised both ways.
        let input: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let (out, _, st) = run(&a, 1, &["cat"], Some(&input));
        assert_eq!(st, ExitStatus::Code(0));
        assert_eq!(out.len(), input.len());
        assert!(out == input, "content differs");
        // Removing the link frees the channel halves for a reset.
        a.remove_link(1);
        assert!(matches!(
            a.call(1, Duration::from_millis(100), |req| Msg::InfoRequest {
                req
            }),
            Err(AgentError::NoLink(Peer { id: 1, name: None }))
        ));
        assert!(e0.channel(1).is_ok());
    }

    #[test]
    fn commands_start_with_no_signal_blocked() {
        // As in PID 1: the agent's threads block signals.
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGTERM);
        set.thread_block().unwrap();
        let (a, _b) = pair();
        let (out, _, _) = run(&a, 1, &["sh", "-c", "grep SigBlk /proc/self/status"], None);
        set.thread_unblock().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out).trim(),
            "SigBlk:\t0000000000000000"
        );
    }

    #[test]
    fn exec_of_missing_program_fails_cleanly() {
        let (a, _b) = pair();
        let r = a.call(1, Duration::from_secs(5), |req| Msg::Exec {
            req,
            exec: ExecRequest {
                argv: vec!["/no/such/prog".into()],
                env: vec![],
                cwd: None,
                stdin: false,
            },
        });
        // Like a shell: status 127, the reason on stderr.
        assert!(
            matches!(
                r,
                Ok(Msg::Exited {
                    status: ExitStatus::Code(127),
                    ..
                })
            ),
            "{r:?}"
        );
        let (_, err, st) = run(&a, 1, &["/no/such/prog"], None);
        assert_eq!(st, ExitStatus::Code(127));
        assert_eq!(
            String::from_utf8_lossy(&err),
            "cannot run /no/such/prog: No such file or directory\n"
        );
    }

    #[test]
    fn info_ping_and_blobs() {
        let (a, b) = pair();
        let info = a
            .call(1, Duration::from_secs(5), |req| Msg::InfoRequest { req })
            .unwrap();
        let Msg::Info { info, .. } = info else {
            panic!()
        };
        assert_eq!(info.sysname, "Linux");
        assert!(info.mem_total > 0);
        assert_eq!(a.ping(1, 100).unwrap().len(), 100);
        // b pings a on a's request and reports.
        let r = a
            .call(1, Duration::from_secs(5), |req| Msg::PingPeer {
                req,
                peer: 0,
                count: 10,
            })
            .unwrap();
        assert!(matches!(r, Msg::PingReport { count: 10, .. }), "{r:?}");
        // Traffic a -> b, checked by b.
        a.send_blobs(1, 3000, 200, 42).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.blob_report(0).0 < 3000 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(b.blob_report(0), (3000, 0, 3000));
        // A second burst starts over at 0 and is counted afresh.
        a.send_blobs(1, 10, 64, 7).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.blob_report(0).2 != 10 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(b.blob_report(0), (10, 0, 10));
        // Traffic b -> a on a's request.
        let r = a
            .call(1, Duration::from_secs(10), |req| Msg::SendBlobs {
                req,
                peer: 0,
                count: 500,
                size: 64,
                seed: 1,
            })
            .unwrap();
        assert!(matches!(r, Msg::Done { .. }));
        assert_eq!(a.blob_report(1), (500, 0, 500));
    }

    #[test]
    fn corrupt_and_reordered_blobs_are_counted_bad() {
        let (a, b) = pair();
        let p = b"hello".to_vec();
        let good = Msg::Blob {
            seq: 0,
            checksum: wire::checksum(&p),
            payload: p.clone(),
        };
        let corrupt = Msg::Blob {
            seq: 1,
            checksum: wire::checksum(&p) ^ 1,
            payload: p.clone(),
        };
        let skipped = Msg::Blob {
            seq: 5,
            checksum: wire::checksum(&p),
            payload: p,
        };
        for m in [good, corrupt, skipped] {
            a.send(1, &m).unwrap();
        }
        let link = a.link(1).unwrap();
        link.send(&[0xde, 0xad], SEND_TIMEOUT).unwrap();
        let r = a
            .call(1, Duration::from_secs(5), |req| Msg::BlobCheck {
                req,
                from: 0,
            })
            .unwrap();
        assert!(
            matches!(
                r,
                Msg::BlobReport {
                    good: 1,
                    bad: 2,
                    next_seq: 6,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(b.bad_frames(), 1);
    }

    #[test]
    fn lost_peer_fails_waiting_requests() {
        let hooks = Hooks {
            power_off: Box::new(|| {}),
            info: Box::new(kernel_info),
        };
        let a = Agent::new(0, hooks);
        let (la, lb) = MemLink::pair(4, 1024);
        a.add_link(1, Arc::new(la));
        let (_req, rx) = a.request(1, |req| Msg::InfoRequest { req }).unwrap();
        drop(lb);
        let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            matches!(m, Msg::Failed { ref message, .. } if message.contains("link lost")),
            "{m:?}"
        );
    }
}
