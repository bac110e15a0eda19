//! Requests the agents carry out, relayed from the CLI: info, ping,
//! traffic, migrate (answered with one reply), and exec, checkpoint,
//! restore (streams between the client and an agent: stdin, output,
//! signals, image chunks, with the request id rewritten on the way).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mknode::agent::{Agent, Diag, Migration, Mode, MoveWatch, RttSummary, Threads};
use mknode::wire::{ExecRequest, Msg, Stream};

use super::{Conn, Daemon, Progress};
use crate::daemon::control::{self, Frame, Reply, Side};
use crate::daemon::error::RequestError;
use crate::daemon::events::What;

/// How long a move may take before the daemon stops waiting for its end.
const MOVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long an agent may take to send the next piece of a checkpoint.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

/// A move driven by the host's agent: the copy running and the bytes gone
/// are told to the client as they happen.
struct Watch<'a, R: Fn(u32, Duration)> {
    running: R,
    sent: &'a dyn Fn(u64),
}

impl<R: Fn(u32, Duration)> MoveWatch for Watch<'_, R> {
    fn running(&self, new_pid: u32, downtime: Duration) {
        (self.running)(new_pid, downtime);
    }
    fn sent(&self, bytes: u64) {
        (self.sent)(bytes);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Daemon {
    /// The endpoint of a kernel that serves requests now.
    fn ready(&self, name: &str) -> Result<u16, RequestError> {
        self.registry().ready_endpoint(name)
    }

    /// A ready instance (not the host, where `what` is not done: `instead`
    /// says what to do) and the agent that reaches it.
    fn instance(
        &self,
        name: &str,
        what: &'static str,
        instead: &'static str,
    ) -> Result<(u16, Arc<Agent>), RequestError> {
        let id = self.ready(name)?;
        if id == 0 {
            return Err(RequestError::NotOnHost { what, instead });
        }
        Ok((id, self.agent()?))
    }

    /// Two different ready kernels, for `what`.
    fn two(&self, what: &'static str, a: &str, b: &str) -> Result<(u16, u16), RequestError> {
        let (a, b) = (self.ready(a)?, self.ready(b)?);
        if a == b {
            return Err(RequestError::SameKernel { what });
        }
        Ok((a, b))
    }

    pub(super) fn info(&self, name: &str) -> Result<Reply, RequestError> {
        let id = self.ready(name)?;
        let info = if id == 0 {
            mknode::agent::kernel_info()
        } else {
            self.agent()?.call_for(
                id,
                Duration::from_secs(5),
                |req| Msg::InfoRequest { req },
                |m| match m {
                    Msg::Info { info, .. } => Some(info),
                    _ => None,
                },
            )?
        };
        Ok(Reply::Info {
            info: serde_json::json!({
                "hostname": info.hostname,
                "sysname": info.sysname,
                "release": info.release,
                "version": info.version,
                "machine": info.machine,
                "cpus_online": info.cpus_online,
                "nodes": info.nodes.iter().map(|n| serde_json::json!({"id": n.id, "cpus": n.cpus, "mem_total": n.mem_total})).collect::<Vec<_>>(),
                "mem_total": info.mem_total,
                "uptime_ms": info.uptime_ms,
            }),
        })
    }

    pub(super) fn ping(&self, from: &str, to: &str, count: u32) -> Result<Reply, RequestError> {
        let (a, b) = self.two("ping", from, to)?;
        let agent = self.agent()?;
        let count = count.max(1);
        let s = if a == 0 {
            RttSummary::of(&agent.facet::<Diag>().ping(b, count)?)
        } else {
            let timeout = Duration::from_secs(10) + Duration::from_millis(u64::from(count) * 5);
            agent.call_for(
                a,
                timeout,
                |req| Msg::PingPeer {
                    req,
                    peer: b,
                    count,
                },
                |m| match m {
                    Msg::PingReport {
                        count,
                        rtt_min_ns,
                        rtt_median_ns,
                        rtt_max_ns,
                        ..
                    } => Some(RttSummary {
                        count,
                        min_ns: rtt_min_ns,
                        median_ns: rtt_median_ns,
                        max_ns: rtt_max_ns,
                    }),
                    _ => None,
                },
            )?
        };
        Ok(Reply::Ping {
            count: s.count,
            min_ns: s.min_ns,
            median_ns: s.median_ns,
            max_ns: s.max_ns,
        })
    }

    pub(super) fn traffic(
        &self,
        from: &str,
        to: &str,
        count: u32,
        size: u32,
    ) -> Result<Reply, RequestError> {
        let (a, b) = self.two("traffic", from, to)?;
        let agent = self.agent()?;
        let t0 = Instant::now();
        let seed = u64::from(std::process::id()) ^ nanos(t0.elapsed()) ^ 0x5eed;
        if a == 0 {
            agent.facet::<Diag>().send_blobs(b, count, size, seed)?;
        } else {
            agent.call_for(
                a,
                Duration::from_secs(60),
                |req| Msg::SendBlobs {
                    req,
                    peer: b,
                    count,
                    size,
                    seed,
                },
                |m| matches!(m, Msg::Done { .. }).then_some(()),
            )?;
        }
        // The last blobs may still be in the ring: poll the receiver.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = if b == 0 {
                agent.facet::<Diag>().blob_report(a)
            } else {
                agent.call_for(
                    b,
                    Duration::from_secs(5),
                    |req| Msg::BlobCheck { req, from: a },
                    |m| match m {
                        Msg::BlobReport {
                            good,
                            bad,
                            next_seq,
                            ..
                        } => Some(mknode::agent::BlobReport {
                            good,
                            bad,
                            next_seq,
                        }),
                        _ => None,
                    },
                )?
            };
            if r.next_seq >= u64::from(count) || Instant::now() > deadline {
                return Ok(Reply::Traffic {
                    sent: u64::from(count),
                    good: r.good,
                    bad: r.bad,
                    elapsed_ns: nanos(t0.elapsed()),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Relays one command: the agent's answers go to the client as wire
    /// frames; the client's stdin and signals go to the agent.
    pub(super) fn exec(
        &self,
        name: &str,
        exec: ExecRequest,
        conn: &Conn,
    ) -> Result<(), RequestError> {
        let (id, agent) = self.instance(name, "exec", "run the command directly")?;
        let (req, rx) = agent.request(id, |req| Msg::Exec { req, exec })?;
        conn.reply(&Reply::ExecStarted);
        // Client -> agent: stdin and signals, with the request id rewritten.
        forward_from_client(conn, Arc::clone(&agent), id, req, move |m| match m {
            Msg::Data {
                stream: Stream::Stdin,
                bytes,
                ..
            } => Some(Msg::Data {
                req,
                stream: Stream::Stdin,
                bytes,
            }),
            Msg::Eof {
                stream: Stream::Stdin,
                ..
            } => Some(Msg::Eof {
                req,
                stream: Stream::Stdin,
            }),
            _ => None,
        });
        relay_answers(&agent, id, req, &rx, conn);
        Ok(())
    }

    /// The name of kernel `id` for events: `host`, or its instance's name.
    fn kernel_name(&self, id: u16) -> String {
        if id == 0 {
            return "host".into();
        }
        self.registry()
            .instances
            .values()
            .find(|i| i.id == id)
            .map_or_else(|| id.to_string(), |i| i.name.clone())
    }

    /// `mkctl migrate PID`: [`Daemon::move_process`], its start, its
    /// running and its end (or failure) published as events.
    pub(super) fn migrate(
        &self,
        pid: u32,
        from: &str,
        to: &str,
        (mode, any_cpu): (Mode, bool),
        progress: Progress<'_>,
        transfer: &dyn Fn(u64),
    ) -> Result<Reply, RequestError> {
        let (a, b) = (self.ready(from)?, self.ready(to)?);
        if a == b {
            return Err(RequestError::AlreadyThere {
                kernel: from.to_string(),
            });
        }
        let (from_name, to_name) = (self.kernel_name(a), self.kernel_name(b));
        self.events.publish(What::MigrateStart {
            pid,
            from: from_name.clone(),
            to: to_name.clone(),
            mode: match mode {
                Mode::Lazy => "lazy",
                Mode::StopCopy => "stop-copy",
                Mode::Tree => "tree",
                Mode::LazyTree => "lazy-tree",
            }
            .into(),
        });
        let running = |new_pid: u32, downtime: Duration| {
            self.events.publish(What::MigrateRunning {
                pid,
                from: from_name.clone(),
                to: to_name.clone(),
                new_pid,
                downtime_ns: nanos(downtime),
            });
            progress(
                to,
                &format!(
                    "running as pid {new_pid} after {:.1} ms of downtime{}",
                    downtime.as_secs_f64() * 1e3,
                    if mode.lazy() {
                        "; the remaining pages follow"
                    } else {
                        ""
                    }
                ),
            );
        };
        let result = self.move_process(pid, (a, from), b, (mode, any_cpu), (running, transfer));
        self.events.publish(match &result {
            Ok(Reply::Migrated {
                new_pid,
                downtime_ns,
                total_ns,
                image_bytes,
                pages,
            }) => What::MigrateEnd {
                pid,
                from: from_name,
                to: to_name,
                new_pid: *new_pid,
                downtime_ns: *downtime_ns,
                total_ns: *total_ns,
                image_bytes: *image_bytes,
                pages: *pages,
            },
            Ok(other) => What::MigrateFailed {
                pid,
                from: from_name,
                to: to_name,
                error: format!("unexpected {} answer", other.kind()),
            },
            Err(e) => What::MigrateFailed {
                pid,
                from: from_name,
                to: to_name,
                error: crate::error_chain(e),
            },
        });
        result
    }

    /// Moves process `pid` from kernel `a` (named `from` in errors) to
    /// `b`; `running` is called once it runs there, `sent` with the bytes
    /// gone so far while they flow.
    fn move_process(
        &self,
        pid: u32,
        (a, from): (u16, &str),
        b: u16,
        (mode, any_cpu): (Mode, bool),
        (running, sent): (impl Fn(u32, Duration), &dyn Fn(u64)),
    ) -> Result<Reply, RequestError> {
        let agent = self.agent()?;
        if a == 0 {
            // The host's agent is the origin: freeze and stream from here
            // (ptrace wants one thread from freeze to kill: this one).
            let r = agent
                .facet::<Migration>()
                .move_out(pid, b, (mode, any_cpu), Watch { running, sent })
                .map_err(|e| RequestError::Move {
                    on: from.to_string(),
                    source: Box::new(e),
                })?;
            return Ok(Reply::Migrated {
                new_pid: r.new_pid,
                downtime_ns: nanos(r.downtime),
                total_ns: nanos(r.total),
                image_bytes: r.image_bytes,
                pages: r.pages,
            });
        }
        let (req, rx) = agent.request(a, |req| match mode {
            Mode::Tree => Msg::MigrateTreeOut {
                req,
                pid,
                to: b,
                any_cpu,
            },
            Mode::LazyTree => Msg::MigrateLazyTreeOut {
                req,
                pid,
                to: b,
                any_cpu,
            },
            _ => Msg::MigrateOut {
                req,
                pid,
                to: b,
                lazy: mode == Mode::Lazy,
                any_cpu,
            },
        })?;
        let deadline = Instant::now() + MOVE_TIMEOUT;
        let mut running = Some(running);
        let answer = loop {
            match rx.recv_deadline(deadline) {
                Ok(Msg::MigrateProgress {
                    new_pid,
                    downtime_ns,
                    ..
                }) => {
                    if let Some(f) = running.take() {
                        f(new_pid, Duration::from_nanos(downtime_ns));
                    }
                }
                Ok(Msg::MigrateSent { bytes, .. }) => sent(bytes),
                other => break other,
            }
        };
        agent.forget(a, req);
        match answer {
            Ok(Msg::MigrateReport {
                new_pid,
                downtime_ns,
                total_ns,
                image_bytes,
                pages,
                ..
            }) => Ok(Reply::Migrated {
                new_pid,
                downtime_ns,
                total_ns,
                image_bytes,
                pages,
            }),
            Ok(Msg::Failed { message, .. }) => Err(RequestError::Remote {
                on: from.to_string(),
                message,
            }),
            Ok(other) => Err(mknode::agent::AgentError::Unexpected {
                peer: agent.peer(a),
                got: other.kind().name().to_string(),
            }
            .into()),
            Err(_) => Err(RequestError::NoAnswer {
                on: from.to_string(),
                timeout: MOVE_TIMEOUT,
            }),
        }
    }

    /// Moves thread `tid` of process `pid` of kernel `from` to `to`: the
    /// process's kernel drives it (the host's agent itself when that is the
    /// host).
    pub(super) fn migrate_thread(
        &self,
        pid: u32,
        tid: u32,
        from: &str,
        to: &str,
    ) -> Result<Reply, RequestError> {
        let (a, b) = (self.ready(from)?, self.ready(to)?);
        let (from_name, to_name) = (self.kernel_name(a), self.kernel_name(b));
        self.events.publish(What::ThreadMigrateStart {
            pid,
            tid,
            from: from_name.clone(),
            to: to_name.clone(),
        });
        let result = self.move_thread(pid, tid, (a, from), (b, to));
        self.events.publish(match &result {
            Ok(Reply::ThreadMigrated {
                at,
                shadow_pid,
                downtime_ns,
            }) => What::ThreadMigrateEnd {
                pid,
                tid,
                at: if at == to { &to_name } else { &from_name }.clone(),
                from: from_name,
                to: to_name,
                shadow_pid: *shadow_pid,
                downtime_ns: *downtime_ns,
            },
            Ok(other) => What::ThreadMigrateFailed {
                pid,
                tid,
                from: from_name,
                to: to_name,
                error: format!("unexpected {} answer", other.kind()),
            },
            Err(e) => What::ThreadMigrateFailed {
                pid,
                tid,
                from: from_name,
                to: to_name,
                error: crate::error_chain(e),
            },
        });
        result
    }

    fn move_thread(
        &self,
        pid: u32,
        tid: u32,
        (a, from): (u16, &str),
        (b, to): (u16, &str),
    ) -> Result<Reply, RequestError> {
        let agent = self.agent()?;
        let moved = if a == 0 {
            agent
                .facet::<Threads>()
                .move_thread(pid, tid, b, None)
                .map(|r| (r.at, r.shadow_pid, nanos(r.downtime)))
                .map_err(|e| RequestError::Remote {
                    on: from.to_string(),
                    message: mknode::error_text(&e),
                })?
        } else {
            agent
                .call_for(
                    a,
                    MOVE_TIMEOUT,
                    |req| Msg::ThreadMove {
                        req,
                        pid,
                        tid,
                        to: b,
                        reply_fd: -1,
                        reply_buf: 0,
                    },
                    |m| match m {
                        Msg::ThreadMoved {
                            at,
                            shadow_pid,
                            downtime_ns,
                            ..
                        } => Some((at, shadow_pid, downtime_ns)),
                        _ => None,
                    },
                )
                .map_err(|e| match e {
                    mknode::agent::AgentError::Failed { message, .. } => RequestError::Remote {
                        on: from.to_string(),
                        message,
                    },
                    e => e.into(),
                })?
        };
        Ok(Reply::ThreadMigrated {
            at: if moved.0 == b { to } else { from }.to_string(),
            shadow_pid: moved.1,
            downtime_ns: moved.2,
        })
    }

    /// Every thread away from its process's kernel: the host's and each
    /// serving instance's (an instance that does not answer is skipped,
    /// with a warning in the daemon's log).
    pub(super) fn threads_away(&self) -> Result<Vec<control::ThreadRow>, RequestError> {
        let agent = self.agent()?;
        let mut lists = vec![("host".to_string(), agent.facet::<Threads>().away())];
        let ready = self.serving();
        for (kernel, id) in ready {
            match agent.call_for(
                id,
                Duration::from_secs(5),
                |req| Msg::ThreadsList { req },
                |m| match m {
                    Msg::ThreadsListed { away, .. } => Some(away),
                    _ => None,
                },
            ) {
                Ok(away) => lists.push((kernel, away)),
                Err(e) => log::warn!("threads: {}", crate::error_chain(&e)),
            }
        }
        let name = |id: u16| super::dsm::peer_name(&agent, id);
        Ok(lists
            .into_iter()
            .flat_map(|(kernel, away)| away.into_iter().map(move |a| (kernel.clone(), a)))
            .map(|(kernel, a)| control::ThreadRow {
                kernel,
                pid: a.pid,
                tid: a.tid,
                at: name(a.at),
                shadow_pid: a.shadow_pid,
            })
            .collect())
    }

    /// Relays an agent's image of a process to the client, as wire frames.
    pub(super) fn checkpoint(
        &self,
        pid: u32,
        on: &str,
        (kill, tree): (bool, bool),
        conn: &Conn,
    ) -> Result<Reply, RequestError> {
        let (id, agent) = self.instance(on, "checkpoint", "not supported yet; use an instance")?;
        let (req, rx) = agent.request(id, |req| {
            if tree {
                Msg::CheckpointTree { req, pid, kill }
            } else {
                Msg::Checkpoint { req, pid, kill }
            }
        })?;
        let result = loop {
            match rx.recv_timeout(CHECKPOINT_TIMEOUT) {
                Ok(m @ Msg::ImageChunk { .. }) => {
                    if !conn.wire(&m) {
                        break Err(RequestError::ClientGone);
                    }
                }
                Ok(Msg::Done { .. }) => {
                    break Ok(Reply::Ok {
                        message: format!("checkpoint of {pid} on {on} written"),
                    })
                }
                Ok(Msg::Failed { message, .. }) => {
                    break Err(RequestError::Remote {
                        on: on.to_string(),
                        message,
                    })
                }
                Ok(_) => {}
                Err(_) => {
                    break Err(RequestError::NoAnswer {
                        on: on.to_string(),
                        timeout: CHECKPOINT_TIMEOUT,
                    })
                }
            }
        };
        agent.forget(id, req);
        result
    }

    /// Relays an image from the client to an agent that restores it, then
    /// the process's output back, like exec.
    pub(super) fn restore(&self, on: &str, conn: &Conn) -> Result<(), RequestError> {
        let (id, agent) = self.instance(on, "restore", "not supported yet; use an instance")?;
        let (req, rx) = agent.request(id, |req| Msg::RestoreImage { req })?;
        conn.reply(&Reply::ExecStarted);
        // Client -> agent: the image, then signals.
        forward_from_client(conn, Arc::clone(&agent), id, req, move |m| match m {
            Msg::ImageChunk { bytes, .. } => Some(Msg::ImageChunk { req, bytes }),
            _ => None,
        });
        relay_answers(&agent, id, req, &rx, conn);
        Ok(())
    }
}

/// Forwards what a client sends for request `req` on endpoint `id` (in a
/// thread of its own): what `map` keeps, with the request id rewritten,
/// and signals. A client that goes away takes the process with it
/// (SIGKILL), as a terminal's process group would.
fn forward_from_client(
    conn: &Conn,
    agent: Arc<Agent>,
    id: u16,
    req: u32,
    map: impl Fn(Msg) -> Option<Msg> + Send + 'static,
) {
    let Ok(mut client_rx) = conn.rx.try_clone() else {
        return;
    };
    thread::spawn(move || loop {
        let m = match control::read_frame(&mut client_rx, Side::Daemon) {
            Ok(Frame::Wire(Msg::Signal { signal, .. })) => Msg::Signal { req, signal },
            Ok(Frame::Wire(m)) => match map(m) {
                Some(m) => m,
                None => continue,
            },
            Ok(_) => continue,
            Err(_) => {
                let _ = agent.send(
                    id,
                    &Msg::Signal {
                        req,
                        signal: libc::SIGKILL,
                    },
                );
                return;
            }
        };
        if agent.send(id, &m).is_err() {
            return;
        }
    });
}

/// Copies an agent's answers to one request to the client as wire frames,
/// until the final one (or the client goes away).
fn relay_answers(agent: &Agent, id: u16, req: u32, rx: &Receiver<Msg>, conn: &Conn) {
    loop {
        let m = rx
            .recv_timeout(Duration::from_secs(3600))
            .unwrap_or(Msg::Failed {
                req,
                message: "no answer from the agent".into(),
            });
        if !conn.wire(&m) || m.is_final() {
            agent.forget(id, req);
            return;
        }
    }
}
