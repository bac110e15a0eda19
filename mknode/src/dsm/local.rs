//! How a process reaches its kernel's DSM: a Unix `SOCK_SEQPACKET` socket
//! served by the agent, one connection per process, kept open while the
//! process lives (when it closes, the agent drops the process's mappings).
//!
//! Where the socket is: `$MK_AGENT` if set and not empty; else the first that exists of
//! `/run/mk/agent.sock` (a guest: guest-init's agent),
//! `$MKCTL_RUN_DIR/agent.sock` and `/run/mkctl/agent.sock` (the host: the
//! daemon's agent).
//!
//! Mapping region `name` of `size` bytes takes two round trips:
//! 1. `Open{name, size}` → `Opened{region, size}` with a descriptor of
//!    this kernel's copy (a memfd), which the process maps `MAP_SHARED`;
//! 2. the process creates a userfaultfd and sends `Attach{region, addr,
//!    len}` with it → `Ok`. The agent registers the mapping (missing and
//!    write-protect faults) and serves its faults from then on.
//!
//! `Detach{region, addr}` → `Ok` after the process unmapped. Every failure
//! answers `Error{errno, message}`.
//!
//! Each message is one datagram: a tag byte, then the fields in the shared
//! little-endian codec. Both sides check every message.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

use super::engine::{Command, Engine, Event};
use super::{check_name, check_size, DsmError, RegionInfo};
use crate::codec::{Field, Reader, Writer};
use crate::migrate::split::SelfMove;

/// The environment variable that names the socket.
pub const ENV: &str = "MK_AGENT";
/// Where a guest kernel's agent (guest-init) serves its processes.
pub const GUEST_SOCKET: &str = "/run/mk/agent.sock";

/// Where a process looks for its agent. An empty variable counts as unset
/// (`MK_AGENT= prog` in a shell; an empty path could only fail).
pub fn agent_path() -> PathBuf {
    let set = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = set(ENV) {
        return PathBuf::from(p);
    }
    let mut candidates = vec![PathBuf::from(GUEST_SOCKET)];
    if let Some(d) = set("MKCTL_RUN_DIR") {
        candidates.push(Path::new(&d).join("agent.sock"));
    }
    candidates.push(PathBuf::from("/run/mkctl/agent.sock"));
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| candidates.remove(0))
}

/// A fresh connection id: what the engine files a process's mappings
/// under (they go together when it ends). Processes whose memory an agent
/// attached itself (a split process) get one too.
pub fn new_conn() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A new connection to this kernel's agent (at [`agent_path`]).
pub(crate) fn connect() -> Result<OwnedFd, DsmError> {
    let path = agent_path();
    let no_agent = |e: nix::errno::Errno| DsmError::NoAgent {
        path: path.display().to_string(),
        source: std::io::Error::from(e),
    };
    let sock = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(no_agent)?;
    let addr = UnixAddr::new(path.as_os_str().as_bytes()).map_err(no_agent)?;
    socket::connect(sock.as_raw_fd(), &addr).map_err(no_agent)?;
    Ok(sock)
}

/// Largest datagram either side accepts.
const MAX_MSG: usize = 1024;

/// Process → agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Open {
        name: String,
        size: u64,
    },
    Attach {
        region: u32,
        addr: u64,
        len: u64,
    },
    Detach {
        region: u32,
        addr: u64,
    },
    /// Thread `tid` moves itself to kernel `to` and waits in
    /// `read(fd, buf, REPLY_LEN)` for the answer (see
    /// `crate::migrate::split::SelfMove`): `REPLY_LEN` raw bytes, not a
    /// `Reply`.
    Migrate {
        tid: u32,
        to: u16,
        fd: i32,
        buf: u64,
    },
    /// Which kernel is this? → `Kernel`.
    Whoami,
}

/// Agent → process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Opened { region: u32, size: u64 },
    Ok,
    Error { errno: i32, message: String },
    Kernel { id: u16 },
}

/// A datagram that is not a message of this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a malformed message on the agent socket")]
pub(crate) struct Malformed;

impl Request {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let w = &mut Writer(&mut v);
        match self {
            Request::Open { name, size } => {
                w.u8(1);
                name.put(w);
                w.u64(*size);
            }
            Request::Attach { region, addr, len } => {
                w.u8(2);
                w.u32(*region);
                w.u64(*addr);
                w.u64(*len);
            }
            Request::Detach { region, addr } => {
                w.u8(3);
                w.u32(*region);
                w.u64(*addr);
            }
            Request::Migrate { tid, to, fd, buf } => {
                w.u8(4);
                w.u32(*tid);
                w.u16(*to);
                w.i32(*fd);
                w.u64(*buf);
            }
            Request::Whoami => w.u8(5),
        }
        v
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Request, Malformed> {
        let r = &mut Reader::new(b);
        let m = match r.u8().map_err(|_| Malformed)? {
            1 => Request::Open {
                name: String::get(r, "name").map_err(|_| Malformed)?,
                size: r.u64().map_err(|_| Malformed)?,
            },
            2 => Request::Attach {
                region: r.u32().map_err(|_| Malformed)?,
                addr: r.u64().map_err(|_| Malformed)?,
                len: r.u64().map_err(|_| Malformed)?,
            },
            3 => Request::Detach {
                region: r.u32().map_err(|_| Malformed)?,
                addr: r.u64().map_err(|_| Malformed)?,
            },
            4 => Request::Migrate {
                tid: r.u32().map_err(|_| Malformed)?,
                to: r.u16().map_err(|_| Malformed)?,
                fd: r.i32().map_err(|_| Malformed)?,
                buf: r.u64().map_err(|_| Malformed)?,
            },
            5 => Request::Whoami,
            _ => return Err(Malformed),
        };
        (r.remaining() == 0).then_some(m).ok_or(Malformed)
    }
}

impl Reply {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let w = &mut Writer(&mut v);
        match self {
            Reply::Opened { region, size } => {
                w.u8(1);
                w.u32(*region);
                w.u64(*size);
            }
            Reply::Ok => w.u8(2),
            Reply::Error { errno, message } => {
                w.u8(3);
                w.i32(*errno);
                message.put(w);
            }
            Reply::Kernel { id } => {
                w.u8(4);
                w.u16(*id);
            }
        }
        v
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Reply, Malformed> {
        let r = &mut Reader::new(b);
        let m = match r.u8().map_err(|_| Malformed)? {
            1 => Reply::Opened {
                region: r.u32().map_err(|_| Malformed)?,
                size: r.u64().map_err(|_| Malformed)?,
            },
            2 => Reply::Ok,
            3 => Reply::Error {
                errno: r.i32().map_err(|_| Malformed)?,
                message: String::get(r, "message").map_err(|_| Malformed)?,
            },
            4 => Reply::Kernel {
                id: r.u16().map_err(|_| Malformed)?,
            },
            _ => return Err(Malformed),
        };
        (r.remaining() == 0).then_some(m).ok_or(Malformed)
    }
}

/// Sends one datagram, with descriptors.
pub(crate) fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let iov = [io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one datagram and the descriptors that came with it; `None` at
/// end of connection.
pub(crate) fn recv(sock: BorrowedFd<'_>) -> nix::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let (n, fds) = {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS installed `fd` in our table for this
                    // message alone; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some((buf, fds)))
}

/// What the agent does for the socket's processes beyond this kernel's
/// engine.
pub trait Opener: Send + Sync {
    /// Resolves a region name (the registry).
    fn open(&self, name: &str, size: u64) -> Result<RegionInfo, DsmError>;
    /// This kernel's id.
    fn kernel(&self) -> u16;
    /// Thread `tid` of process `pid` (as this kernel sees them) moves
    /// itself to kernel `to` (see `Request::Migrate`). `Ok`: it runs there
    /// and has its answer; `Err`: it did not move and gets this errno.
    fn migrate(&self, pid: i32, tid: i32, to: u16, m: SelfMove) -> Result<(), DsmError>;
}

/// The agent's side of the socket; stops (and removes the socket) when
/// dropped.
#[derive(Debug)]
pub struct LocalServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl LocalServer {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Serves processes at `path` (replacing a stale socket there).
pub fn serve(
    path: &Path,
    engine: Arc<Engine>,
    opener: Arc<dyn Opener>,
) -> Result<LocalServer, DsmError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(DsmError::io)?;
    }
    let _ = std::fs::remove_file(path);
    let sock = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(DsmError::sys("socket"))?;
    let addr = UnixAddr::new(path.as_os_str().as_bytes()).map_err(DsmError::sys("socket path"))?;
    socket::bind(sock.as_raw_fd(), &addr).map_err(DsmError::sys("bind"))?;
    socket::listen(&sock, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
        .map_err(DsmError::sys("listen"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = Arc::clone(&stop);
    let thread = thread::Builder::new()
        .name("mknode-dsm-local".into())
        .spawn(move || accept_loop(&sock, &st, &engine, &opener))
        .map_err(DsmError::io)?;
    Ok(LocalServer {
        path: path.to_path_buf(),
        stop,
        thread: Some(thread),
    })
}

fn accept_loop(sock: &OwnedFd, stop: &AtomicBool, engine: &Arc<Engine>, opener: &Arc<dyn Opener>) {
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [nix::poll::PollFd::new(
            sock.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if !matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)), Ok(n) if n > 0)
        {
            continue;
        }
        let Ok(raw) = socket::accept4(sock.as_raw_fd(), SockFlag::SOCK_CLOEXEC) else {
            continue;
        };
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        let pid = socket::getsockopt(&conn, socket::sockopt::PeerCredentials)
            .map(|c| c.pid())
            .unwrap_or(0);
        let id = new_conn();
        let (engine, opener) = (Arc::clone(engine), Arc::clone(opener));
        let _ = thread::Builder::new()
            .name("mknode-dsm-conn".into())
            .spawn(move || {
                serve_conn(&conn, pid, id, &engine, &*opener);
                engine.post(Event::Command(Command::Closed { conn: id }));
            });
    }
}

fn serve_conn(conn: &OwnedFd, pid: i32, id: u64, engine: &Engine, opener: &dyn Opener) {
    loop {
        let (bytes, mut fds) = match recv(conn.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return,
        };
        let answer = match Request::decode(&bytes) {
            Err(e) => Err(DsmError::Refused {
                errno: libc::EPROTO,
                message: e.to_string(),
            }),
            Ok(Request::Open { name, size }) => open(engine, opener, &name, size),
            Ok(Request::Attach { region, addr, len }) => match fds.pop() {
                Some(uffd) if fds.is_empty() => engine
                    .ask(|reply| Command::Attach {
                        region,
                        addr,
                        len,
                        uffd,
                        pid,
                        conn: id,
                        reply,
                    })
                    .and_then(|r| r)
                    .map(|()| (Reply::Ok, None)),
                _ => Err(DsmError::Refused {
                    errno: libc::EINVAL,
                    message: "attach needs exactly one userfaultfd".into(),
                }),
            },
            Ok(Request::Detach { addr, .. }) => engine
                .ask(|reply| Command::Detach {
                    addr,
                    conn: id,
                    reply,
                })
                .and_then(|r| r)
                .map(|()| (Reply::Ok, None)),
            Ok(Request::Whoami) => Ok((
                Reply::Kernel {
                    id: opener.kernel(),
                },
                None,
            )),
            Ok(Request::Migrate { tid, to, fd, buf }) => {
                let m = SelfMove { fd, buf };
                match opener.migrate(pid, tid as i32, to, m) {
                    // Answered where the thread runs now.
                    Ok(()) => continue,
                    Err(e) => {
                        log::info!(
                            "threads: {pid}/{tid} did not move to {to}: {}",
                            crate::error_text(&e)
                        );
                        let b = crate::migrate::split::reply(-e.errno(), opener.kernel(), fd);
                        if send(conn.as_fd(), &b, &[]).is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let sent = match answer {
            Ok((reply, fd)) => {
                let raw: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
                send(conn.as_fd(), &reply.encode(), &raw)
            }
            Err(e) => send(
                conn.as_fd(),
                &Reply::Error {
                    errno: e.errno(),
                    message: crate::error_text(&e),
                }
                .encode(),
                &[],
            ),
        };
        if sent.is_err() {
            return;
        }
    }
}

fn open(
    engine: &Engine,
    opener: &dyn Opener,
    name: &str,
    size: u64,
) -> Result<(Reply, Option<OwnedFd>), DsmError> {
    check_name(name)?;
    check_size(size)?;
    let info = opener.open(name, size)?;
    let region = info.id;
    let fd = engine.ask(|reply| Command::Open { info, reply })??;
    Ok((Reply::Opened { region, size }, Some(fd)))
}

/// How long a client waits for the agent's answer.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        for r in [
            Request::Open {
                name: "counters".into(),
                size: 8192,
            },
            Request::Attach {
                region: 3,
                addr: 0x7f00_0000_0000,
                len: 4096,
            },
            Request::Detach { region: 3, addr: 1 },
            Request::Migrate {
                tid: 77,
                to: 2,
                fd: 5,
                buf: 0x7ffd_0000_1000,
            },
            Request::Whoami,
        ] {
            assert_eq!(Request::decode(&r.encode()), Ok(r.clone()));
            let mut longer = r.encode();
            longer.push(0);
            assert_eq!(Request::decode(&longer), Err(Malformed));
            for n in 0..r.encode().len() {
                assert_eq!(Request::decode(&r.encode()[..n]), Err(Malformed));
            }
        }
        for r in [
            Reply::Opened {
                region: 1,
                size: 4096,
            },
            Reply::Ok,
            Reply::Error {
                errno: 22,
                message: "bad".into(),
            },
            Reply::Kernel { id: 3 },
        ] {
            assert_eq!(Reply::decode(&r.encode()), Ok(r));
        }
        assert_eq!(Reply::decode(&[9]), Err(Malformed));
    }
}
