//! The exec facet: runs commands for a peer, streams their stdin in and
//! their output back, delivers the peer's signals, and reports how they
//! ended.
//!
//! It also keeps the registry of what runs for whom: a process restored by
//! the migration facet is registered here too (so `Signal`s reach it), and
//! a process that moved to another kernel is marked so that its exit is
//! reported from where it ended up rather than from the local kill that
//! ended its frozen original.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::{lock, Agent, AgentRef, Facet};
use crate::wire::{ExecRequest, ExitStatus, Kind, Msg, Stream, MAX_CHUNK};

/// A process that had moved to another kernel was lost with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the process was lost: {why}")]
pub struct ProcessLost {
    pub why: String,
}

/// Where the end of a moved process comes from.
pub type MovedEnd = Receiver<Result<ExitStatus, ProcessLost>>;

#[derive(Debug)]
struct Running {
    pid: u32,
    stdin: Option<Sender<Option<Vec<u8>>>>,
}

/// See the module doc.
#[derive(Debug)]
pub struct Exec {
    /// What runs for a peer, by (peer, their req).
    running: Mutex<HashMap<(u16, u32), Running>>,
    /// Processes of ours that moved to another kernel: their real exit
    /// status arrives from there (by pid).
    moved: Mutex<HashMap<u32, MovedEnd>>,
}

impl Facet for Exec {
    fn kinds(&self) -> &'static [Kind] {
        &[Kind::Exec, Kind::Data, Kind::Eof, Kind::Signal]
    }

    fn handle(self: Arc<Self>, agent: &Arc<Agent>, peer: u16, m: Msg) -> Option<Msg> {
        match m {
            Msg::Exec { req, exec } => self.start(agent, peer, req, exec),
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
                let pid = lock(&self.running).get(&(peer, req)).map(|e| e.pid);
                if let (Some(pid), Ok(sig)) = (pid, nix::sys::signal::Signal::try_from(signal)) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(-1)),
                        sig,
                    );
                }
            }
            // Output of a command we asked a peer to run: an answer.
            other => return Some(other),
        }
        None
    }
}

impl Exec {
    pub fn new(_: AgentRef) -> Self {
        Exec {
            running: Mutex::new(HashMap::new()),
            moved: Mutex::new(HashMap::new()),
        }
    }

    /// Registers `pid` as what request `(peer, req)` runs, so that its
    /// `Signal`s reach it (a restored process, like an exec'd one);
    /// `None` forgets it.
    pub fn set_running(&self, peer: u16, req: u32, pid: Option<u32>) {
        let mut running = lock(&self.running);
        match pid {
            Some(pid) => {
                running.insert((peer, req), Running { pid, stdin: None });
            }
            None => {
                running.remove(&(peer, req));
            }
        }
    }

    /// Marks `pid` (a process of ours) as moved away: [`Exec::final_status`]
    /// will wait for `end` instead of trusting the local kill.
    pub fn mark_moved(&self, pid: u32, end: MovedEnd) {
        lock(&self.moved).insert(pid, end);
    }

    /// The exit status to report for `pid`: the local one, unless the
    /// process moved to another kernel, then the one from there (waits);
    /// an error when that kernel went down with it.
    pub fn final_status(&self, pid: u32, local: ExitStatus) -> Result<ExitStatus, ProcessLost> {
        let end = lock(&self.moved).remove(&pid);
        match end {
            Some(rx) => rx.recv().unwrap_or(Ok(local)),
            None => Ok(local),
        }
    }

    fn stdin(&self, peer: u16, req: u32, bytes: Option<Vec<u8>>) {
        let tx = lock(&self.running)
            .get(&(peer, req))
            .and_then(|e| e.stdin.clone());
        if let Some(tx) = tx {
            let _ = tx.send(bytes);
        }
    }

    fn start(self: Arc<Self>, agent: &Arc<Agent>, peer: u16, req: u32, exec: ExecRequest) {
        let Some(prog) = exec.argv.first() else {
            let _ = agent.post(
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
                let _ = agent.post(
                    peer,
                    &Msg::Data {
                        req,
                        stream: Stream::Stderr,
                        bytes: text.into_bytes(),
                    },
                );
                let _ = agent.post(
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
        lock(&self.running).insert(
            (peer, req),
            Running {
                pid,
                stdin: stdin_tx,
            },
        );
        let _ = agent.post(peer, &Msg::Started { req, pid });

        let me = Arc::clone(agent);
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
                thread::spawn(move || pump(&me, peer, req, stream, r))
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
            let end = match self.final_status(pid, status) {
                Ok(status) => Msg::Exited { req, status },
                Err(lost) => Msg::Failed {
                    req,
                    message: lost.to_string(),
                },
            };
            lock(&self.running).remove(&(peer, req));
            let _ = me.send(peer, &end);
        });
    }
}

/// Copies one output stream of a command to `peer` in chunks.
fn pump(agent: &Agent, peer: u16, req: u32, stream: Stream, mut r: Box<dyn Read + Send>) {
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
                if agent.send(peer, &m).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = agent.send(peer, &Msg::Eof { req, stream });
}

fn exit_status(s: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(sig)) => ExitStatus::Signal(sig),
        (None, None) => ExitStatus::Code(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{hooks, pair, run};
    use super::*;
    use std::time::Duration;

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
            Err(super::super::AgentError::NoLink(super::super::Peer {
                id: 1,
                name: None
            }))
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
}
