//! The daemon process (`mkctl daemon run`): owns the run directory, the
//! shared window and one QEMU process per instance; runs the host's agent
//! (endpoint 0); serves the CLI over the control socket, one thread per
//! connection.
//!
//! This file is the accept loop and the dispatch: each [`Request`] goes to
//! the one method that carries it out and answers a `Reply` or a
//! [`RequestError`], which becomes the error reply here and nowhere else.
//! The work lives in the children:
//! - `instances`: boot, stop, restart, the monitor, status — the lifecycle, by the
//!   rules of [`super::state`];
//! - `relay`: requests carried out by agents (exec, info, ping, traffic,
//!   migrate, checkpoint, restore);
//! - `adopt`: taking over the instances of an earlier daemon;
//! - `kexec`: the host's end of the window of kexec instances, which
//!   `mkctl boot` starts through the kernel's interface.
//!
//! Invariants it keeps:
//! - nothing starts before the topology validated;
//! - what a later daemon needs to adopt the instances is in the run
//!   directory whenever the registry's lock is released
//!   ([`super::saved`]): a daemon that is killed leaves its QEMUs running,
//!   and the next one (`mkctl daemon restart`, or any command that starts
//!   one) adopts them (`adopt`); a daemon that stops normally stops them;
//! - an instance whose QEMU exits or whose agent's heartbeat stops is shown
//!   `failed` with the reason, within a second or two; with
//!   `restart = "on-failure"` the monitor restarts it through the same
//!   restart as `mkctl restart`, at most `restart_limit` times.

mod adopt;
mod dsm;
mod instances;
mod kexec;
mod relay;

use std::ops::{Deref, DerefMut};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use super::control::{self, Frame, Reply, Request, Side};
use super::error::RequestError;
use super::events::{Bus, What};
use super::paths::RunDir;
use super::saved::Saved;
use super::state::{stop_summary, Registry, StartedBy, State};
use super::window::HostWindow;

#[derive(Debug)]
struct Daemon {
    run: RunDir,
    registry: Mutex<Registry>,
    window: Mutex<Option<Arc<HostWindow>>>,
    stop: AtomicBool,
    /// Exit leaving the instances running (`mkctl daemon restart`).
    handover: AtomicBool,
    /// What was last written to the run directory's state file.
    saved: Mutex<Option<Saved>>,
    /// State changes and migration steps, for `mkctl events`.
    events: Bus,
    /// Subscribers still writing to their client (the daemon waits a
    /// little for them to say it stopped before it exits).
    subscribers: std::sync::atomic::AtomicUsize,
    /// Taken at start: the executable may be replaced while we run.
    build: String,
}

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot use run directory {}", path.display())]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another daemon (pid {pid}) already serves {}", dir.display())]
    AlreadyRunning { pid: u32, dir: PathBuf },
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Where the host agent's log (the `log` facade) goes: the daemon's
/// stderr, which is its log file in the run directory.
#[derive(Debug)]
struct DaemonLog;

impl log::Log for DaemonLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "mkctl daemon: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

/// How long the daemon, as it exits, waits for event subscribers to write
/// what they hold and the end of their stream.
const SUBSCRIBER_FLUSH: Duration = Duration::from_secs(2);

/// How often an event subscriber with nothing to send checks that its
/// client is still there.
const HANGUP_CHECK: Duration = Duration::from_secs(1);

/// True when the client closed its side of `s` (it sends nothing after its
/// request, so anything but "nothing to read yet" means it is gone).
fn hung_up(s: &UnixStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    match recv(
        s.as_raw_fd(),
        &mut b,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
        Ok(_) | Err(_) => true,
    }
}

/// How often the daemon checks that its socket is still its own.
const SOCKET_CHECK: Duration = Duration::from_secs(2);

/// The inode of the run directory's socket, if it is there.
fn socket_inode(run: &RunDir) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(run.socket()).ok().map(|m| m.ino())
}

/// `mkctl daemon run`: serves until asked to stop (or SIGTERM/SIGINT),
/// then stops every instance.
pub fn run(run: RunDir) -> Result<(), DaemonError> {
    if log::set_logger(&DaemonLog).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    std::fs::create_dir_all(run.path()).map_err(|source| DaemonError::RunDir {
        path: run.path().into(),
        source,
    })?;
    if let Ok(c) = UnixStream::connect(run.socket()) {
        drop(c);
        let pid = std::fs::read_to_string(run.pid_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        return Err(DaemonError::AlreadyRunning {
            pid,
            dir: run.path().into(),
        });
    }
    let _ = std::fs::remove_file(run.socket());
    let listen_err = |source| DaemonError::Listen {
        path: run.socket(),
        source,
    };
    let listener = UnixListener::bind(run.socket()).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let socket_ino = socket_inode(&run);
    std::fs::write(run.pid_file(), format!("{}\n", std::process::id())).map_err(|source| {
        DaemonError::RunDir {
            path: run.pid_file(),
            source,
        }
    })?;
    for sig in [
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGINT,
        nix::sys::signal::SIGHUP,
    ] {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_signal),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; no other handler for these signals exists.
        unsafe {
            let _ = nix::sys::signal::sigaction(sig, &action);
        }
    }

    let d = Arc::new(Daemon {
        run: run.clone(),
        registry: Mutex::new(Registry::default()),
        window: Mutex::new(None),
        stop: AtomicBool::new(false),
        handover: AtomicBool::new(false),
        saved: Mutex::new(None),
        events: Bus::default(),
        subscribers: std::sync::atomic::AtomicUsize::new(0),
        build: control::build_id(),
    });
    log::info!(
        "pid {} serving {}",
        std::process::id(),
        run.socket().display()
    );
    // Before the first request is served: what an earlier daemon left
    // running becomes this one's.
    d.adopt();
    let monitor = {
        let d = Arc::clone(&d);
        thread::spawn(move || d.monitor())
    };
    let mut last_check = Instant::now();
    while !d.stopping() {
        if last_check.elapsed() >= SOCKET_CHECK {
            last_check = Instant::now();
            if socket_inode(&run) != socket_ino {
                // Nobody can reach this daemon to stop it any more (its run
                // directory was removed, say by a test that was killed):
                // stop rather than keep instances running for ever.
                log::warn!(
                    "{} was removed or replaced; nobody can reach this daemon",
                    run.socket().display()
                );
                break;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let d = Arc::clone(&d);
                thread::spawn(move || d.serve(stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => log::warn!("accept: {e}"),
        }
    }
    let handover = d.handover.load(Ordering::SeqCst);
    d.stop.store(true, Ordering::SeqCst);
    d.events.publish(What::DaemonStopping);
    if handover {
        log::info!("exiting; the instances run on for the next daemon to adopt");
    } else {
        log::info!("stopping every instance");
        let names: Vec<String> = d.registry().instances.keys().cloned().collect();
        d.stop_instances(&names, Duration::from_secs(10), false, &|_, _| {});
    }
    let _ = monitor.join();
    // Subscribers drain their queues and tell their clients the daemon
    // stopped; one stuck on a client that does not read is not waited for
    // (its writes time out).
    d.events.close();
    let deadline = Instant::now() + SUBSCRIBER_FLUSH;
    while d.subscribers.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if socket_inode(&run) == socket_ino {
        // Only what is still ours: a newer daemon may serve this directory.
        let _ = std::fs::remove_file(run.socket());
        let _ = std::fs::remove_file(run.agent_socket());
        let _ = std::fs::remove_file(run.pid_file());
    }
    if !handover {
        // Nothing is left to adopt.
        let _ = std::fs::remove_file(run.state());
        if let Some(tree) = run.ram_tree() {
            let _ = std::fs::remove_dir_all(tree);
        }
    }
    Ok(())
}

/// Sends progress lines of one request back to its client.
type Progress<'a> = &'a dyn Fn(&str, &str);

/// The client's connection: requests that stream (exec, restore,
/// checkpoint) read from it and write wire frames to it.
struct Conn {
    rx: UnixStream,
    tx: Mutex<UnixStream>,
}

impl Conn {
    fn reply(&self, r: &Reply) -> bool {
        let mut w = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        control::send_reply(&mut *w, r).is_ok()
    }
    fn wire(&self, m: &mknode::wire::Msg) -> bool {
        let mut w = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        control::send_wire(&mut *w, m).is_ok()
    }
}

/// The registry, locked; when the lock is released every instance whose
/// state changed meanwhile is published on the event bus (in the order of
/// the lock, so events follow the states' own order). Every change of
/// state goes through this lock, so none is missed, wherever it is made.
struct RegistryGuard<'a> {
    reg: MutexGuard<'a, Registry>,
    daemon: &'a Daemon,
    before: Vec<(String, State)>,
}

impl Deref for RegistryGuard<'_> {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.reg
    }
}

impl DerefMut for RegistryGuard<'_> {
    fn deref_mut(&mut self) -> &mut Registry {
        &mut self.reg
    }
}

impl Drop for RegistryGuard<'_> {
    fn drop(&mut self) {
        for inst in self.reg.instances.values() {
            let was = self
                .before
                .iter()
                .find(|(n, _)| *n == inst.name)
                .map(|(_, s)| *s);
            if was == Some(inst.state) {
                continue;
            }
            self.daemon.events.publish(What::State {
                instance: inst.name.clone(),
                from: was.map(|s| s.as_str().to_string()),
                to: inst.state.as_str().to_string(),
                reason: inst.reason.clone().filter(|_| inst.state == State::Failed),
                restarts: inst.restart.limit().map(|_| inst.policy.restarts),
            });
        }
        self.daemon.save(&self.reg);
    }
}

impl Daemon {
    /// `mkctl events`: writes the last `last` events kept, then each event
    /// as it is published, until the bus closes (the daemon is stopping:
    /// the stream ends with `Reply::Ok`) or the client goes away. Runs on
    /// the connection's own thread; the bus never waits for it (a client
    /// that reads too slowly misses events, and is told so by a gap event).
    fn stream_events(&self, last: u32, conn: &Conn) -> Result<(), RequestError> {
        let sub = self
            .events
            .subscribe(usize::try_from(last).unwrap_or(usize::MAX))
            .ok_or(RequestError::Stopping)?;
        self.subscribers.fetch_add(1, Ordering::SeqCst);
        // No write timeout: a client that stops reading blocks only this
        // thread (a timed-out write would cut a frame in two); its queue
        // fills meanwhile and it gets a gap event when it reads again. The
        // daemon's exit waits SUBSCRIBER_FLUSH for it at most.
        log::info!("events: a subscriber ({} now)", self.events.subscribers());
        let send = |event| conn.reply(&Reply::Event { event });
        let mut open =
            conn.reply(&Reply::Subscribed { seq: sub.seq }) && sub.past.into_iter().all(send);
        while open {
            if sub.rx.is_empty() {
                if let Some(gap) = self.events.take_gap(sub.id) {
                    open = send(gap);
                    continue;
                }
            }
            match sub.rx.recv_timeout(HANGUP_CHECK) {
                Ok(event) => open = send(event),
                // Quiet: a client that hung up is forgotten now, not at
                // the next event.
                Err(RecvTimeoutError::Timeout) => open = !hung_up(&conn.rx),
                Err(RecvTimeoutError::Disconnected) => {
                    conn.reply(&Reply::Ok {
                        message: "the daemon stopped".into(),
                    });
                    break;
                }
            }
        }
        drop(sub.rx);
        let left = self.subscribers.fetch_sub(1, Ordering::SeqCst) - 1;
        log::info!("events: a subscriber left ({left} now)");
        Ok(())
    }

    fn registry(&self) -> RegistryGuard<'_> {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let before = reg
            .instances
            .values()
            .map(|i| (i.name.clone(), i.state))
            .collect();
        RegistryGuard {
            reg,
            daemon: self,
            before,
        }
    }

    /// Writes the state file when `reg` changed since it was last written
    /// (called as the registry's lock is released).
    fn save(&self, reg: &Registry) {
        let now = Saved::of(reg);
        let mut last = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(&now) {
            return;
        }
        if let Err(e) = now.store(&self.run.state()) {
            log::warn!(
                "cannot write {} (a restarted daemon could not adopt the instances): {e}",
                self.run.state().display()
            );
        }
        *last = Some(now);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || SIGNALLED.load(Ordering::SeqCst)
    }

    fn serve(self: Arc<Self>, stream: UnixStream) {
        let Ok(rx) = stream.try_clone() else { return };
        let mut conn = Conn {
            rx,
            tx: Mutex::new(stream),
        };
        let req = match control::read_frame(&mut conn.rx, Side::Daemon) {
            Ok(Frame::Request(r)) => r,
            Ok(_) => return,
            // A client that only checked the daemon is there.
            Err(control::FrameError::Closed) => return,
            Err(e) => {
                log::warn!("bad request: {}", crate::error_chain(&e));
                return;
            }
        };
        let progress = |instance: &str, message: &str| {
            conn.reply(&Reply::Progress {
                instance: instance.into(),
                message: message.into(),
            });
        };
        let reply = match self.dispatch(req, &conn, &progress) {
            Ok(Some(reply)) => reply,
            // A streamed request answered as it went.
            Ok(None) => return,
            Err(e) => e.reply(),
        };
        conn.reply(&reply);
    }

    /// Carries out one request: its reply, or `None` when it streamed its
    /// answers to the client itself.
    fn dispatch(
        &self,
        req: Request,
        conn: &Conn,
        progress: Progress<'_>,
    ) -> Result<Option<Reply>, RequestError> {
        let reply = match req {
            Request::Boot {
                config,
                instances,
                timeout_ms,
            } => self.boot(
                &config,
                &instances,
                Duration::from_millis(timeout_ms),
                StartedBy::Request,
                progress,
            )?,
            Request::Status => Reply::Status {
                status: self.status(),
            },
            Request::KexecPrepare { config, instances } => {
                self.kexec_prepare(&config, &instances, progress)?
            }
            Request::KexecBooted {
                instances,
                booted,
                reason,
                timeout_ms,
            } => self.kexec_booted(
                &instances,
                booted,
                &reason,
                Duration::from_millis(timeout_ms),
                progress,
            )?,
            Request::Stop {
                instances,
                timeout_ms,
                force,
            } => {
                let stopped = self.stop(
                    instances,
                    Duration::from_millis(timeout_ms),
                    force,
                    progress,
                )?;
                Reply::Stopped {
                    message: stop_summary(&stopped),
                    instances: stopped.iter().map(Into::into).collect(),
                }
            }
            Request::Restart {
                instances,
                stop_timeout_ms,
                boot_timeout_ms,
            } => self.restart(
                instances,
                Duration::from_millis(stop_timeout_ms),
                Duration::from_millis(boot_timeout_ms),
                StartedBy::Request,
                progress,
            )?,
            Request::Threads => Reply::Threads {
                threads: self.threads_away()?,
            },
            Request::DsmReport { name } => Reply::Dsm {
                regions: self.dsm_report(name.as_deref())?,
            },
            Request::DsmRemove { name } => self.dsm_remove(&name)?,
            Request::Shutdown => {
                self.stop.store(true, Ordering::SeqCst);
                Reply::Ok {
                    message: "the daemon is stopping its instances and exiting".into(),
                }
            }
            Request::Handover => {
                self.handover.store(true, Ordering::SeqCst);
                self.stop.store(true, Ordering::SeqCst);
                Reply::Ok {
                    message: format!(
                        "the daemon (pid {}) is exiting; its instances run on",
                        std::process::id()
                    ),
                }
            }
            Request::Info { instance } => self.info(&instance)?,
            Request::Ping { from, to, count } => self.ping(&from, &to, count)?,
            Request::Traffic {
                from,
                to,
                count,
                size,
            } => self.traffic(&from, &to, count, size)?,
            Request::Migrate {
                pid,
                from,
                to,
                lazy,
                tree,
                any_cpu,
            } => self.migrate(
                pid,
                &from,
                &to,
                (mknode::agent::Mode::from_flags(lazy, tree), any_cpu),
                progress,
                &|bytes| {
                    conn.reply(&Reply::Transfer { bytes });
                },
            )?,
            Request::MigrateThread { pid, tid, from, to } => {
                self.migrate_thread(pid, tid, &from, &to)?
            }
            Request::Checkpoint {
                pid,
                on,
                kill,
                tree,
            } => self.checkpoint(pid, &on, (kill, tree), conn)?,
            Request::Exec {
                instance,
                argv,
                env,
                cwd,
                stdin,
            } => {
                let exec = mknode::wire::ExecRequest {
                    argv,
                    env,
                    cwd,
                    stdin,
                };
                self.exec(&instance, exec, conn)?;
                return Ok(None);
            }
            Request::Restore { on } => {
                self.restore(&on, conn)?;
                return Ok(None);
            }
            Request::Events { last } => {
                self.stream_events(last, conn)?;
                return Ok(None);
            }
        };
        Ok(Some(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::events::{Event, QUEUE};

    fn daemon() -> Arc<Daemon> {
        Arc::new(Daemon {
            run: RunDir(std::env::temp_dir().join("mkctl-events-unit")),
            registry: Mutex::new(Registry::default()),
            window: Mutex::new(None),
            stop: AtomicBool::new(false),
            handover: AtomicBool::new(false),
            saved: Mutex::new(None),
            events: Bus::default(),
            subscribers: std::sync::atomic::AtomicUsize::new(0),
            build: String::new(),
        })
    }

    /// A subscriber on a real socket: its connection thread and the
    /// client's end.
    fn subscriber(d: &Arc<Daemon>, last: u32) -> (thread::JoinHandle<()>, UnixStream) {
        let (server, client) = UnixStream::pair().unwrap();
        let before = d.events.subscribers();
        let t = {
            let d = Arc::clone(d);
            thread::spawn(move || {
                let conn = Conn {
                    rx: server.try_clone().unwrap(),
                    tx: Mutex::new(server),
                };
                d.stream_events(last, &conn).unwrap();
            })
        };
        let t0 = Instant::now();
        while d.events.subscribers() == before {
            assert!(t0.elapsed() < Duration::from_secs(5));
            thread::sleep(Duration::from_millis(5));
        }
        (t, client)
    }

    fn next(c: &mut UnixStream) -> Reply {
        match control::read_frame(c, Side::Client).unwrap() {
            Frame::Reply(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn event(c: &mut UnixStream) -> Event {
        match next(c) {
            Reply::Subscribed { .. } => event(c),
            Reply::Event { event } => event,
            other => panic!("{other:?}"),
        }
    }

    /// A client that does not read fills its socket and its queue: the
    /// daemon goes on publishing at full speed, another client gets every
    /// event, and the stalled one gets a gap event when it reads again.
    #[test]
    fn a_client_that_stops_reading_blocks_neither_the_daemon_nor_others() {
        let d = daemon();
        let (_t1, mut stalled) = subscriber(&d, 0);
        let (_t2, mut live) = subscriber(&d, 0);
        let got = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = {
            let got = Arc::clone(&got);
            thread::spawn(move || {
                let mut seqs = Vec::new();
                loop {
                    match next(&mut live) {
                        Reply::Event { event } => {
                            got.store(event.seq, Ordering::SeqCst);
                            seqs.push(event.seq);
                        }
                        Reply::Ok { .. } => return seqs,
                        Reply::Subscribed { seq } => assert_eq!(seq, 0),
                        other => panic!("{other:?}"),
                    }
                }
            })
        };
        // Far more than the socket buffer and the queue hold.
        let n = 20_000u64;
        let t0 = Instant::now();
        for _ in 0..n {
            let seq = d.events.publish(What::DaemonStopping);
            // Paced so the live reader keeps up, on a loaded machine too
            // (the stalled one is far behind all along).
            while seq - got.load(Ordering::SeqCst) > (QUEUE / 2) as u64 {
                thread::yield_now();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "publishing took {:?}",
            t0.elapsed()
        );
        // The stalled client reads again: every seq once, in order, either
        // as an event or inside a gap event that names it (a gap may come
        // more than once: each time its queue had a slot free).
        stalled
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        d.events.publish(What::DaemonStopping);
        let (mut expect, mut seen, mut gaps) = (1u64, 0u64, 0u64);
        while expect <= n + 1 {
            let e = event(&mut stalled);
            match e.what {
                What::Gap { missed, first_seq } => {
                    assert_eq!(first_seq, expect, "{e:?}");
                    assert_eq!(e.seq - first_seq + 1, missed, "{e:?}");
                    gaps += 1;
                }
                _ => {
                    assert_eq!(e.seq, expect, "{e:?}");
                    seen += 1;
                }
            }
            expect = e.seq + 1;
        }
        assert!(gaps >= 1);
        assert!(seen >= QUEUE as u64, "{seen}");
        d.events.close();
        assert!(matches!(next(&mut stalled), Reply::Ok { .. }));
        let live_seqs = reader.join().unwrap();
        assert_eq!(live_seqs, (1..=n + 1).collect::<Vec<_>>());
    }

    /// `--last` replays the ring, then goes on; a client that hangs up is
    /// forgotten without an event to notice it.
    #[test]
    fn last_replays_and_a_hung_up_client_is_forgotten() {
        let d = daemon();
        for _ in 0..5 {
            d.events.publish(What::DaemonStopping);
        }
        let (t, mut c) = subscriber(&d, 2);
        assert_eq!(event(&mut c).seq, 4);
        assert_eq!(event(&mut c).seq, 5);
        d.events.publish(What::DaemonStopping);
        assert_eq!(event(&mut c).seq, 6);
        drop(c);
        t.join().unwrap();
        assert_eq!(d.subscribers.load(Ordering::SeqCst), 0);
        assert_eq!(d.events.subscribers(), 1, "until the next publish");
        d.events.publish(What::DaemonStopping);
        assert_eq!(d.events.subscribers(), 0);
    }
}
