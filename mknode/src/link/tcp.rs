//! [`TcpLink`]: a link over one TCP connection, and the handshake that
//! opens one ([`listen`], [`Listener::accept`], [`connect`]). It owns the
//! connection, the framing and the bytes of a frame not yet whole; it
//! knows nothing of the messages inside the frames.
//!
//! ## Frames
//!
//! Each message is one frame: its length as a `u32` little-endian, then its
//! bytes. The peer is untrusted: a length above the link's limit breaks
//! the link for good ([`LinkError::Broken`], naming the length), before
//! anything is allocated for it; the receive buffer never grows past the
//! larger of 64 KiB and the limit plus the 4-byte header. A receive that times out in the middle of
//! a frame keeps what it has in the link, and the next one goes on from
//! there: a frame is never lost or split. A send writes its frame whole or
//! not at all as far as the caller can tell: when its time runs out with
//! only part of the frame written, the stream can no longer be framed, so
//! the link is broken and the connection shut down (the peer sees it gone).
//!
//! ## Handshake
//!
//! Right after the connection is made, each side sends a hello of
//! [`HELLO_LEN`] bytes and reads the other's (all little-endian):
//!
//! | bytes  | field                                                |
//! |--------|------------------------------------------------------|
//! | 0..8   | magic, [`MAGIC`] (`MKNDLINK`)                        |
//! | 8..10  | protocol version, [`VERSION`]                        |
//! | 10..12 | the sender's endpoint id                             |
//! | 12..16 | the largest message the sender accepts, at least [`MIN_MAX_MESSAGE`] |
//!
//! Any later version keeps bytes 0..10, so a mismatch is always told as
//! one. Both sides send first and read second (16 bytes fit any socket
//! buffer), and each checks the other's hello itself; the link's limit is
//! the smaller of the two. Frames follow at once.
//!
//! ## Waiting
//!
//! The socket is used with `MSG_DONTWAIT` (and `MSG_NOSIGNAL`: a peer that
//! went away is an error, not a signal); a call that finds nothing to read
//! or no room to write waits in `ppoll(2)` ([`Wait::Block`]), or first
//! retries for a while ([`Wait::BusyPoll`]). On a machine whose idle vCPUs
//! halt, each blocking hand-off costs a wake-up through the hypervisor
//! (~25 µs on the test machine); spinning avoids it at the price of a CPU
//! while a message is awaited. `benches/link.rs` measures both against the
//! rings.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::socket::{recv, sendmsg, MsgFlags};
use nix::sys::time::TimeSpec;

use super::{Link, LinkError};

/// The first bytes of a hello: "this is an mknode link".
pub const MAGIC: [u8; 8] = *b"MKNDLINK";
/// The version of the framing and the hello this code speaks.
pub const VERSION: u16 = 1;
/// Bytes of a hello.
pub const HELLO_LEN: usize = 16;
/// A peer must accept messages of at least this many bytes (a page: the
/// agent's protocols need that much).
pub const MIN_MAX_MESSAGE: usize = 4096;
/// The limit [`TcpOptions::default`] offers: the ring of a 16 MiB window
/// shared by three kernels takes about this much.
pub const DEFAULT_MAX_MESSAGE: usize = 2 << 20;
/// How long [`Wait::BusyPoll`] spins by default before it sleeps: a round
/// trip over loopback with both readers spinning takes well under this.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
/// How long the other side has to send its hello, by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of a frame's length prefix.
const HEADER: usize = 4;
/// The receive buffer's size: one read takes up to this much, so many small
/// frames cost one system call. A larger frame grows it (up to the limit).
const READ_CHUNK: usize = 64 << 10;

/// How a call waits when the socket is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Sleep in `ppoll(2)` at once: no CPU spent waiting.
    Block,
    /// Retry for `spin` (or the call's timeout, if shorter), then sleep as
    /// [`Wait::Block`] does.
    BusyPoll { spin: Duration },
}

/// How a [`TcpLink`] is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// The largest message this side sends or accepts (the handshake
    /// settles on the smaller of both sides'); at most `u32::MAX`.
    pub max_message: usize,
    /// How calls wait.
    pub wait: Wait,
    /// How long [`Listener::accept`] gives a new connection for its hello.
    pub handshake_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            max_message: DEFAULT_MAX_MESSAGE,
            wait: Wait::Block,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

impl TcpOptions {
    /// These options with [`Wait::BusyPoll`] for `spin`.
    pub fn busy_poll(self, spin: Duration) -> Self {
        TcpOptions {
            wait: Wait::BusyPoll { spin },
            ..self
        }
    }

    /// These options with a message limit of `max` bytes.
    pub fn max_message(self, max: usize) -> Self {
        TcpOptions {
            max_message: max,
            ..self
        }
    }
}

/// A hello was not what it should be, or did not come.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no hello within {0:?}")]
    Timeout(Duration),
    #[error("the peer closed the connection after {got} of the {HELLO_LEN} bytes of its hello")]
    Closed { got: usize },
    #[error("wrong magic {got:02x?}: the peer is not an mknode link")]
    BadMagic { got: [u8; 8] },
    #[error("the peer speaks version {got} of the link protocol, this side {want}")]
    Version { got: u16, want: u16 },
    #[error("the peer says it is endpoint {0}, which is this side's own id")]
    SameId(u16),
    #[error(
        "the peer accepts messages of at most {max} bytes, less than the minimum {MIN_MAX_MESSAGE}"
    )]
    Limit { max: u32 },
    #[error("exchanging hellos")]
    Io(#[source] io::Error),
}

/// [`listen`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("a message limit of {0} bytes does not fit a frame's 32-bit length")]
    Limit(usize),
}

/// [`Listener::accept`] failed. The listener itself is still good.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("accepting a connection")]
    Accept(#[source] io::Error),
    #[error("setting up the connection from {addr}")]
    Setup {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("handshake with {addr}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: HandshakeError,
    },
}

/// [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("a message limit of {0} bytes does not fit a frame's 32-bit length")]
    Limit(usize),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("setting up the connection to {addr}")]
    Setup {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("handshake with {addr}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: HandshakeError,
    },
}

/// A listening socket that hands out links to the agents that connect.
#[derive(Debug)]
pub struct Listener {
    inner: std::net::TcpListener,
    me: u16,
    opts: TcpOptions,
}

/// Listens on `addr` for peers of endpoint `me` (port 0: any free port,
/// see [`Listener::local_addr`]).
pub fn listen(addr: SocketAddr, me: u16, opts: TcpOptions) -> Result<Listener, ListenError> {
    check_limit(opts.max_message).map_err(ListenError::Limit)?;
    let inner =
        std::net::TcpListener::bind(addr).map_err(|source| ListenError::Bind { addr, source })?;
    Ok(Listener { inner, me, opts })
}

impl Listener {
    /// The address peers connect to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Waits for the next peer, exchanges hellos (it has
    /// [`TcpOptions::handshake_timeout`] for its own) and returns its
    /// endpoint id and the link to it. A peer that connects and stays
    /// silent holds this call for that long: accept on a thread of its own.
    pub fn accept(&self) -> Result<(u16, TcpLink), AcceptError> {
        let (stream, addr) = self.inner.accept().map_err(AcceptError::Accept)?;
        let deadline = Instant::now() + self.opts.handshake_timeout;
        let mut link = TcpLink::new(stream, self.opts)
            .map_err(|source| AcceptError::Setup { addr, source })?;
        let peer = link
            .handshake(self.me, deadline)
            .map_err(|source| AcceptError::Handshake { addr, source })?;
        Ok((peer, link))
    }
}

/// Connects endpoint `me` to the agent listening at `addr` and exchanges
/// hellos, all within `timeout`; returns the peer's endpoint id and the
/// link to it.
pub fn connect(
    addr: SocketAddr,
    me: u16,
    timeout: Duration,
    opts: TcpOptions,
) -> Result<(u16, TcpLink), ConnectError> {
    let deadline = Instant::now() + timeout;
    check_limit(opts.max_message).map_err(ConnectError::Limit)?;
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| ConnectError::Connect { addr, source })?;
    let mut link =
        TcpLink::new(stream, opts).map_err(|source| ConnectError::Setup { addr, source })?;
    let peer = link
        .handshake(me, deadline)
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    Ok((peer, link))
}

fn check_limit(max: usize) -> Result<(), usize> {
    match u32::try_from(max) {
        Ok(_) => Ok(()),
        Err(_) => Err(max),
    }
}

/// A link over a connected TCP stream; see the module doc for the framing.
/// Internally synchronised: one thread may send while another receives.
pub struct TcpLink {
    stream: TcpStream,
    /// The peer's address, for messages (kept: it cannot be asked for once
    /// the connection is gone).
    peer: SocketAddr,
    max: usize,
    wait: Wait,
    /// Held for a whole frame, so frames of two senders never interleave.
    tx: Mutex<()>,
    rx: Mutex<RxState>,
    /// Why the link broke for good (set once; every call fails with it).
    broken: OnceLock<String>,
    /// [`TcpLink::shutdown`] was called: the end is this side's doing.
    shut: AtomicBool,
}

impl std::fmt::Debug for TcpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLink")
            .field("peer", &self.peer)
            .field("max", &self.max)
            .field("wait", &self.wait)
            .field("broken", &self.broken.get())
            .finish_non_exhaustive()
    }
}

/// Bytes received and not yet handed out: `buf[start..end]`, whole frames
/// and at most one partial frame at its end.
struct RxState {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// What the receive buffer holds at its start.
enum Next {
    /// A whole frame: its bytes are `buf[range]`.
    Frame(std::ops::Range<usize>),
    /// Not a whole frame yet: the buffer needs `need` bytes from `start`.
    Partial { need: usize },
    /// A frame of `len` bytes, over the limit.
    TooLarge { len: u32 },
}

impl RxState {
    fn next(&self, max: usize) -> Next {
        let have = self.end - self.start;
        if have < HEADER {
            return Next::Partial { need: HEADER };
        }
        let mut len = [0u8; HEADER];
        len.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
        let len = u32::from_le_bytes(len);
        // A u32 fits usize on every target this runs on (64-bit Linux).
        let body = len as usize;
        if body > max {
            return Next::TooLarge { len };
        }
        // body <= max <= u32::MAX: no overflow.
        let need = HEADER + body;
        if have < need {
            return Next::Partial { need };
        }
        Next::Frame(self.start + HEADER..self.start + need)
    }

    /// Makes room after `end` for a frame of `need` bytes that starts at
    /// `start`: moves the partial frame to the buffer's start, and grows the
    /// buffer when the frame is larger than it (`need` was checked against
    /// the limit).
    fn room_for(&mut self, need: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        // Compact when the frame would not fit from where it starts, or
        // when little room is left to read into.
        if self.buf.len() - self.start < need || self.buf.len() - self.end < READ_CHUNK / 4 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
    }
}

/// The result of waiting for the socket.
enum Ready {
    /// Try again.
    Yes,
    /// The time is up.
    TimedOut,
}

/// One call's wait: its deadline and spin phase, read from the clock only
/// once the socket was first found not ready.
struct Waiting {
    wait: Wait,
    timeout: Duration,
    start: Option<Instant>,
}

impl Waiting {
    fn new(wait: Wait, timeout: Duration) -> Waiting {
        Waiting {
            wait,
            timeout,
            start: None,
        }
    }

    fn until(wait: Wait, deadline: Instant) -> Waiting {
        let now = Instant::now();
        Waiting {
            wait,
            timeout: deadline.saturating_duration_since(now),
            start: Some(now),
        }
    }

    /// Waits until `fd` may be ready for `events`, the spin phase is over
    /// for another retry, or the time is up.
    fn wait(&mut self, fd: &impl AsFd, events: PollFlags) -> Result<Ready, Errno> {
        let now = Instant::now();
        let start = *self.start.get_or_insert(now);
        let elapsed = now - start;
        if elapsed >= self.timeout {
            return Ok(Ready::TimedOut);
        }
        if let Wait::BusyPoll { spin } = self.wait {
            if elapsed < spin {
                std::hint::spin_loop();
                return Ok(Ready::Yes);
            }
        }
        let left = self.timeout - elapsed;
        let mut fds = [PollFd::new(fd.as_fd(), events)];
        match ppoll(&mut fds, Some(TimeSpec::from(left)), None) {
            // Ready, or an error or hang-up the next call reports; or the
            // time is up (the next call finds nothing and ends up here).
            Ok(_) | Err(Errno::EINTR) => Ok(Ready::Yes),
            Err(e) => Err(e),
        }
    }
}

/// Errors of an established connection that mean the peer is gone.
fn peer_gone_errno(e: Errno) -> bool {
    matches!(
        e,
        Errno::EPIPE
            | Errno::ECONNRESET
            | Errno::ECONNABORTED
            | Errno::ENOTCONN
            | Errno::ETIMEDOUT
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
            | Errno::EHOSTDOWN
            | Errno::ENETDOWN
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TcpLink {
    /// A link over `stream`, already connected to a peer that frames as
    /// this module does, with no handshake (for a caller that made the
    /// connection its own way). Sets `TCP_NODELAY`: a message goes out at
    /// once, not when the previous one was acknowledged.
    pub fn new(stream: TcpStream, opts: TcpOptions) -> io::Result<TcpLink> {
        check_limit(opts.max_message).map_err(|max| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                ListenError::Limit(max).to_string(),
            )
        })?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        Ok(TcpLink {
            stream,
            peer,
            max: opts.max_message,
            wait: opts.wait,
            tx: Mutex::new(()),
            rx: Mutex::new(RxState {
                buf: vec![0; READ_CHUNK],
                start: 0,
                end: 0,
            }),
            broken: OnceLock::new(),
            shut: AtomicBool::new(false),
        })
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// How this link's calls wait.
    pub fn wait(&self) -> Wait {
        self.wait
    }

    /// Closes the connection both ways: the peer's calls fail with
    /// [`LinkError::PeerGone`], and so do this side's from now on (a
    /// receive blocked on another thread wakes up).
    pub fn shutdown(&self) {
        self.shut.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends this side's hello and checks the peer's; returns its endpoint
    /// id, and lowers the link's limit to the peer's when that is smaller.
    fn handshake(&mut self, me: u16, deadline: Instant) -> Result<u16, HandshakeError> {
        let mut hello = [0u8; HELLO_LEN];
        hello[0..8].copy_from_slice(&MAGIC);
        hello[8..10].copy_from_slice(&VERSION.to_le_bytes());
        hello[10..12].copy_from_slice(&me.to_le_bytes());
        // The limit fits a u32 (checked when the link was made).
        let max = u32::try_from(self.max).unwrap_or(u32::MAX);
        hello[12..16].copy_from_slice(&max.to_le_bytes());
        let timeout = deadline.saturating_duration_since(Instant::now());
        let mut w = Waiting::until(self.wait, deadline);
        let mut sent = 0;
        while sent < HELLO_LEN {
            match self.send_some(&[IoSlice::new(&hello[sent..])]) {
                Ok(n) => sent += n,
                Err(Errno::EAGAIN) => match w.wait(&self.stream, PollFlags::POLLOUT) {
                    Ok(Ready::Yes) => {}
                    Ok(Ready::TimedOut) => return Err(HandshakeError::Timeout(timeout)),
                    Err(e) => return Err(HandshakeError::Io(e.into())),
                },
                Err(Errno::EINTR) => {}
                Err(e) => return Err(HandshakeError::Io(e.into())),
            }
        }
        // Exactly the hello's bytes, no more: frames may follow at once and
        // belong to the receive buffer.
        let mut got = 0;
        let mut peer = [0u8; HELLO_LEN];
        while got < HELLO_LEN {
            match recv(
                self.stream.as_raw_fd(),
                &mut peer[got..],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return Err(HandshakeError::Closed { got }),
                Ok(n) => got += n,
                Err(Errno::EAGAIN) => match w.wait(&self.stream, PollFlags::POLLIN) {
                    Ok(Ready::Yes) => {}
                    Ok(Ready::TimedOut) => return Err(HandshakeError::Timeout(timeout)),
                    Err(e) => return Err(HandshakeError::Io(e.into())),
                },
                Err(Errno::EINTR) => {}
                Err(e) if peer_gone_errno(e) => return Err(HandshakeError::Closed { got }),
                Err(e) => return Err(HandshakeError::Io(e.into())),
            }
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&peer[0..8]);
        if magic != MAGIC {
            return Err(HandshakeError::BadMagic { got: magic });
        }
        let version = u16::from_le_bytes([peer[8], peer[9]]);
        if version != VERSION {
            return Err(HandshakeError::Version {
                got: version,
                want: VERSION,
            });
        }
        let id = u16::from_le_bytes([peer[10], peer[11]]);
        if id == me {
            return Err(HandshakeError::SameId(id));
        }
        let their_max = u32::from_le_bytes([peer[12], peer[13], peer[14], peer[15]]);
        // A u32 fits usize on every target this runs on (64-bit Linux).
        if (their_max as usize) < MIN_MAX_MESSAGE {
            return Err(HandshakeError::Limit { max: their_max });
        }
        self.max = self.max.min(their_max as usize);
        Ok(id)
    }

    /// One `sendmsg` of `parts`, without waiting and without `SIGPIPE`.
    fn send_some(&self, parts: &[IoSlice<'_>]) -> Result<usize, Errno> {
        sendmsg::<()>(
            self.stream.as_raw_fd(),
            parts,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        )
    }

    /// Breaks the link for good (the first reason stays), and shuts the
    /// connection so the peer sees the end rather than a stalled stream.
    fn break_link(&self, why: String) -> LinkError {
        let _ = self.broken.set(why);
        self.shutdown();
        self.broken_error()
            .unwrap_or_else(|| LinkError::Broken("broken".into()))
    }

    fn broken_error(&self) -> Option<LinkError> {
        self.broken.get().map(|why| LinkError::Broken(why.clone()))
    }

    /// The connection ended (`what` happened): the peer is gone, unless this
    /// side broke the link, which is then what a caller learns.
    fn gone(&self, what: String) -> LinkError {
        if let Some(e) = self.broken_error() {
            return e;
        }
        if self.shut.load(Ordering::SeqCst) {
            return LinkError::PeerGone(format!(
                "the link to {} was shut down on this side",
                self.peer
            ));
        }
        LinkError::PeerGone(format!("{} {what}", self.peer))
    }

    fn io_error(&self, e: Errno) -> LinkError {
        if peer_gone_errno(e) {
            return self.gone(format!("reset the connection: {}", e.desc()));
        }
        self.broken_error().unwrap_or_else(|| {
            LinkError::Broken(format!(
                "socket to {}: {}",
                self.peer,
                crate::io_error_text(&e.into())
            ))
        })
    }
}

impl Link for TcpLink {
    fn send(&self, msg: &[u8], timeout: Duration) -> Result<(), LinkError> {
        if let Some(e) = self.broken_error() {
            return Err(e);
        }
        let too_large = || LinkError::TooLarge {
            len: msg.len(),
            max: self.max,
        };
        if msg.len() > self.max {
            return Err(too_large());
        }
        let header = u32::try_from(msg.len())
            .map_err(|_| too_large())?
            .to_le_bytes();
        let total = HEADER + msg.len();
        let _frame = lock(&self.tx);
        let mut w = Waiting::new(self.wait, timeout);
        let mut done = 0;
        loop {
            let r = if done < HEADER {
                self.send_some(&[IoSlice::new(&header[done..]), IoSlice::new(msg)])
            } else {
                self.send_some(&[IoSlice::new(&msg[done - HEADER..])])
            };
            match r {
                Ok(n) => {
                    done += n;
                    if done == total {
                        return Ok(());
                    }
                }
                Err(Errno::EAGAIN) => match w.wait(&self.stream, PollFlags::POLLOUT) {
                    Ok(Ready::Yes) => {}
                    Ok(Ready::TimedOut) if done == 0 => return Err(LinkError::Timeout(timeout)),
                    Ok(Ready::TimedOut) => {
                        return Err(self.break_link(format!(
                            "a send to {} timed out after {done} of the {total} bytes of a \
                             frame; the stream cannot be framed any more",
                            self.peer
                        )))
                    }
                    Err(e) => return Err(self.io_error(e)),
                },
                Err(Errno::EINTR) => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    fn recv(&self, buf: &mut Vec<u8>, timeout: Duration) -> Result<bool, LinkError> {
        if let Some(e) = self.broken_error() {
            return Err(e);
        }
        let mut rx = lock(&self.rx);
        let mut w = Waiting::new(self.wait, timeout);
        loop {
            let need = match rx.next(self.max) {
                Next::Frame(r) => {
                    buf.clear();
                    buf.extend_from_slice(&rx.buf[r.clone()]);
                    rx.start = r.end;
                    return Ok(true);
                }
                Next::TooLarge { len } => {
                    return Err(self.break_link(format!(
                        "{} sent a frame of {len} bytes, over the link's limit of {}",
                        self.peer, self.max
                    )))
                }
                Next::Partial { need } => need,
            };
            rx.room_for(need);
            let end = rx.end;
            match recv(
                self.stream.as_raw_fd(),
                &mut rx.buf[end..],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    let have = rx.end - rx.start;
                    return Err(self.gone(if have == 0 {
                        "closed the connection".into()
                    } else {
                        format!(
                            "closed the connection in the middle of a frame \
                             ({have} of {need} bytes)"
                        )
                    }));
                }
                Ok(n) => rx.end += n,
                Err(Errno::EAGAIN) => match w.wait(&self.stream, PollFlags::POLLIN) {
                    Ok(Ready::Yes) => {}
                    Ok(Ready::TimedOut) => return Ok(false),
                    Err(e) => return Err(self.io_error(e)),
                },
                Err(Errno::EINTR) => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    fn max_message(&self) -> usize {
        self.max
    }
}
