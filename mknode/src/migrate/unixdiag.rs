//! AF_UNIX sockets as the kernel's `sock_diag` netlink interface describes
//! them, looked up by inode (`socket:[<inode>]` in `/proc/<pid>/fd`):
//! type, state, peer, whether bound to a name, shutdown bits. Nothing of
//! the socket is touched. Needs `CONFIG_UNIX_DIAG` (a module on Debian's
//! 6.1: not loaded, the lookup fails and the socket is refused).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What the kernel says of one AF_UNIX socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnixSock {
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub kind: u8,
    /// `TCP_ESTABLISHED` (1) when connected, `TCP_LISTEN` (10), ...
    pub state: u8,
    /// The peer's inode; 0: none.
    pub peer: u32,
    /// Bound to a path or an abstract name.
    pub named: bool,
    /// `RCV_SHUTDOWN` (1) | `SEND_SHUTDOWN` (2).
    pub shutdown: u8,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NETLINK_SOCK_DIAG: i32 = 4;
const UDIAG_SHOW_NAME: u32 = 1;
const UDIAG_SHOW_PEER: u32 = 4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_SHUTDOWN: u16 = 6;
const NLMSG_ERROR: u16 = 2;

/// The AF_UNIX socket with inode `ino`, or `Ok(None)` if there is none
/// (e.g. a TCP socket).
pub(crate) fn query(ino: u32) -> io::Result<Option<UnixSock>> {
    // SAFETY: socket returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(libc::AF_UNIX as u8);
    req.push(0); // protocol
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&ino.to_ne_bytes());
    req.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER).to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // no cookie
                                       // SAFETY: sends from a live buffer on our socket (to the kernel: the
                                       // default destination of a netlink socket).
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: receives into a live buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_reply(&buf[..n as usize])
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One netlink reply: a `unix_diag_msg` with its attributes, or an error
/// (`ENOENT`: no AF_UNIX socket has that inode).
pub(crate) fn parse_reply(b: &[u8]) -> io::Result<Option<UnixSock>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "sock_diag: malformed reply");
    let len = u32_at(b, 0).ok_or_else(bad)? as usize;
    let ty = u16_at(b, 4).ok_or_else(bad)?;
    if len < 16 || len > b.len() {
        return Err(bad());
    }
    let b = &b[..len];
    if ty == NLMSG_ERROR {
        let e = -(u32_at(b, 16).ok_or_else(bad)? as i32);
        return match e {
            0 | libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if ty != SOCK_DIAG_BY_FAMILY || b.len() < 32 || b[16] != libc::AF_UNIX as u8 {
        return Err(bad());
    }
    let mut s = UnixSock {
        kind: b[17],
        state: b[18],
        peer: 0,
        named: false,
        shutdown: 0,
    };
    let mut at = 32;
    while at + 4 <= b.len() {
        let alen = usize::from(u16_at(b, at).ok_or_else(bad)?);
        let aty = u16_at(b, at + 2).ok_or_else(bad)? & 0x3fff;
        if alen < 4 || at + alen > b.len() {
            return Err(bad());
        }
        let payload = &b[at + 4..at + alen];
        match aty {
            UNIX_DIAG_NAME => s.named = !payload.is_empty(),
            UNIX_DIAG_PEER => s.peer = u32_at(payload, 0).ok_or_else(bad)?,
            UNIX_DIAG_SHUTDOWN => s.shutdown = *payload.first().ok_or_else(bad)?,
            _ => {}
        }
        at += (alen + 3) & !3;
    }
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socketpair of this process, as the kernel describes it.
    #[test]
    fn a_socketpair_is_described_with_its_peer() {
        let mut sv = [0; 2];
        // SAFETY: socketpair writes two descriptors, which we then own.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: just created, ours.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        // SAFETY: shutdown on our socket.
        unsafe { libc::shutdown(a.as_raw_fd(), libc::SHUT_WR) };
        let ino = |fd: &OwnedFd| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .ino() as u32
        };
        let Ok(Some(s)) = query(ino(&a)) else {
            // No CONFIG_UNIX_DIAG here: nothing to check.
            return;
        };
        assert_eq!(s.kind, libc::SOCK_DGRAM as u8);
        assert_eq!(s.peer, ino(&b));
        assert!(!s.named);
        assert_eq!(s.shutdown & 2, 2);
        assert_eq!(query(u32::MAX - 5).unwrap(), None);
        drop(b);
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert!(parse_reply(&[]).is_err());
        assert!(parse_reply(&[200, 0, 0, 0, 20, 0]).is_err());
        let mut m = vec![0u8; 36];
        m[0] = 36;
        m[4] = 20;
        m[16] = 1;
        m[32] = 2; // attribute shorter than its header
        assert!(parse_reply(&m).is_err());
    }
}
