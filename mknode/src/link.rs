//! A `Link` is a duplex, ordered, message-preserving connection to one peer
//! agent. The agent speaks only to this trait; the transports under it are
//! a `shmem-ring` channel (between kernels) and an in-process pair (tests).
//!
//! Every implementation must pass the same conformance checks
//! ([`conformance`]): order, content, message boundaries, timeouts, and a
//! clear error once the peer is gone.

use std::time::Duration;

/// Why a link could not carry a message.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the peer is gone: {0}")]
    PeerGone(String),
    /// The peer stopped (no heartbeat) or detached, but may attach again:
    /// the link stays. `recv` returns it after waiting out its timeout, so a
    /// caller's loop does not spin.
    #[error("the peer is down: {why}")]
    PeerDown {
        why: String,
        /// Detached on purpose (not just silent).
        detached: bool,
        /// How long it has been silent, when it did not detach.
        quiet: Option<Duration>,
    },
    #[error("the link is broken: {0}")]
    Broken(String),
    #[error("message of {len} bytes is larger than the link's limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// A connection to one peer. Implementations are internally synchronised:
/// one thread may send while another receives.
pub trait Link: Send + Sync + std::fmt::Debug {
    /// Sends one message, waiting up to `timeout` for room.
    fn send(&self, msg: &[u8], timeout: Duration) -> Result<(), LinkError>;
    /// Receives one message into `buf` (replacing its contents), waiting up
    /// to `timeout`; `Ok(false)` when nothing arrived in time.
    fn recv(&self, buf: &mut Vec<u8>, timeout: Duration) -> Result<bool, LinkError>;
    /// The largest message `send` accepts.
    fn max_message(&self) -> usize;
}

/// An in-process link pair over crossbeam channels: the reference
/// implementation the agent's unit tests run on.
#[derive(Debug)]
pub struct MemLink {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    rx: crossbeam_channel::Receiver<Vec<u8>>,
    max: usize,
}

impl MemLink {
    /// Two ends of one link, each holding `capacity` messages per direction.
    pub fn pair(capacity: usize, max: usize) -> (MemLink, MemLink) {
        let (a_tx, b_rx) = crossbeam_channel::bounded(capacity);
        let (b_tx, a_rx) = crossbeam_channel::bounded(capacity);
        (
            MemLink {
                tx: a_tx,
                rx: a_rx,
                max,
            },
            MemLink {
                tx: b_tx,
                rx: b_rx,
                max,
            },
        )
    }
}

impl Link for MemLink {
    fn send(&self, msg: &[u8], timeout: Duration) -> Result<(), LinkError> {
        if msg.len() > self.max {
            return Err(LinkError::TooLarge {
                len: msg.len(),
                max: self.max,
            });
        }
        self.tx
            .send_timeout(msg.to_vec(), timeout)
            .map_err(|e| match e {
                crossbeam_channel::SendTimeoutError::Timeout(_) => LinkError::Timeout(timeout),
                crossbeam_channel::SendTimeoutError::Disconnected(_) => {
                    LinkError::PeerGone("the other end was dropped".into())
                }
            })
    }

    fn recv(&self, buf: &mut Vec<u8>, timeout: Duration) -> Result<bool, LinkError> {
        match self.rx.recv_timeout(timeout) {
            Ok(m) => {
                *buf = m;
                Ok(true)
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(false),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(LinkError::PeerGone("the other end was dropped".into()))
            }
        }
    }

    fn max_message(&self) -> usize {
        self.max
    }
}

/// Checks every `Link` implementation must pass, given a fresh pair.
pub mod conformance {
    use super::*;

    /// Order, content and boundaries of many messages of varied sizes, in
    /// both directions at once.
    pub fn order_and_content(a: &dyn Link, b: &dyn Link, count: u64) {
        let t = Duration::from_secs(10);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..count {
                    let len = (i as usize * 7919) % (a.max_message().min(4096) - 8) + 8;
                    let mut m = vec![(i % 251) as u8; len];
                    m[..8].copy_from_slice(&i.to_le_bytes());
                    a.send(&m, t).expect("send a->b");
                }
            });
            let mut buf = Vec::new();
            for i in 0..count {
                assert!(b.recv(&mut buf, t).expect("recv"), "message {i} timed out");
                let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
                assert_eq!(seq, i, "out of order");
                let len = (i as usize * 7919) % (a.max_message().min(4096) - 8) + 8;
                assert_eq!(buf.len(), len, "boundary lost at {i}");
                assert!(
                    buf[8..].iter().all(|&x| x == (i % 251) as u8),
                    "content of {i}"
                );
            }
        });
    }

    /// An empty link times out instead of blocking forever, and a message
    /// over the limit is refused whole.
    pub fn timeouts_and_limits(a: &dyn Link, b: &dyn Link) {
        let mut buf = Vec::new();
        let t0 = std::time::Instant::now();
        assert!(!b.recv(&mut buf, Duration::from_millis(50)).unwrap());
        assert!(t0.elapsed() >= Duration::from_millis(45));
        let big = vec![0u8; a.max_message() + 1];
        assert!(matches!(
            a.send(&big, Duration::from_millis(10)),
            Err(LinkError::TooLarge { .. })
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlink_conformance() {
        let (a, b) = MemLink::pair(64, 64 * 1024);
        conformance::order_and_content(&a, &b, 20_000);
        conformance::timeouts_and_limits(&a, &b);
    }

    fn ring_pair() -> (shmem_ring::Endpoint, shmem_ring::Endpoint) {
        let w =
            shmem_ring::Window::anonymous(shmem_ring::Layout::with_capacity(2, 256 << 10).unwrap())
                .unwrap();
        (w.attach(0).unwrap(), w.attach(1).unwrap())
    }

    #[test]
    fn ringlink_conformance() {
        let (e0, e1) = ring_pair();
        let a = RingLink::open(&e0, 1).unwrap();
        let b = RingLink::open(&e1, 0).unwrap();
        conformance::order_and_content(&a, &b, 50_000);
        conformance::timeouts_and_limits(&a, &b);
    }

    #[test]
    fn ringlink_detached_peer_is_down_after_the_timeout() {
        let (e0, e1) = ring_pair();
        let a = RingLink::open(&e0, 1).unwrap();
        drop(e1);
        let mut buf = Vec::new();
        let t0 = std::time::Instant::now();
        // Said after the timeout, like an idle link, so a loop does not
        // spin; the link stays (the peer may attach again).
        match a.recv(&mut buf, Duration::from_millis(30)) {
            Err(LinkError::PeerDown {
                detached: true,
                quiet: None,
                why,
            }) => {
                assert!(why.contains("detached"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() >= Duration::from_millis(25));
    }

    #[test]
    fn memlink_peer_gone() {
        let (a, b) = MemLink::pair(4, 1024);
        drop(b);
        assert!(matches!(
            a.send(b"x", Duration::from_millis(10)),
            Err(LinkError::PeerGone(_))
        ));
    }
}

/// A `shmem-ring` channel as a link: the sender and receiver halves of one
/// endpoint's channel to a peer, each behind a lock so a send and a receive
/// can run at once on different threads.
///
/// A peer that is not there (not booted yet, stopped, or dead) is not an
/// error for `recv`: it only means nothing arrives, so the link outlives
/// restarts of the peer. Corrupt data is [`LinkError::Broken`], for good.
#[derive(Debug)]
pub struct RingLink {
    tx: std::sync::Mutex<shmem_ring::Sender>,
    rx: std::sync::Mutex<shmem_ring::Receiver>,
    max: usize,
}

impl RingLink {
    pub fn new(tx: shmem_ring::Sender, rx: shmem_ring::Receiver) -> RingLink {
        let max = tx.max_message();
        RingLink {
            tx: std::sync::Mutex::new(tx),
            rx: std::sync::Mutex::new(rx),
            max,
        }
    }

    /// Opens `endpoint`'s channel to `peer` as a link.
    pub fn open(endpoint: &shmem_ring::Endpoint, peer: u16) -> Result<RingLink, shmem_ring::Error> {
        let (tx, rx) = endpoint.channel(peer)?;
        Ok(RingLink::new(tx, rx))
    }
}

fn ring_error(e: shmem_ring::Error, timeout: Duration) -> LinkError {
    use shmem_ring::Error as E;
    match e {
        E::Timeout { .. } | E::Full { .. } | E::Empty { .. } => LinkError::Timeout(timeout),
        E::PeerDead { .. } | E::PeerGone { .. } => LinkError::PeerGone(e.to_string()),
        E::TooLarge { len, max } => LinkError::TooLarge { len, max },
        other => LinkError::Broken(crate::error_text(&other)),
    }
}

impl Link for RingLink {
    fn send(&self, msg: &[u8], timeout: Duration) -> Result<(), LinkError> {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.send(msg, timeout).map_err(|e| ring_error(e, timeout))
    }

    fn recv(&self, buf: &mut Vec<u8>, timeout: Duration) -> Result<bool, LinkError> {
        use shmem_ring::Error as E;
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = std::time::Instant::now();
        match rx.recv(buf, timeout) {
            Ok(_) => Ok(true),
            Err(e @ (E::PeerDead { .. } | E::PeerGone { .. })) => {
                // Nobody there: wait as an idle link would (no spinning),
                // then say so; the peer may attach again.
                drop(rx);
                std::thread::sleep(timeout.saturating_sub(t0.elapsed()));
                Err(LinkError::PeerDown {
                    detached: matches!(e, E::PeerGone { .. }),
                    quiet: match e {
                        E::PeerDead { quiet, .. } => Some(quiet),
                        _ => None,
                    },
                    why: e.to_string(),
                })
            }
            Err(e) => match ring_error(e, timeout) {
                LinkError::Timeout(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    fn max_message(&self) -> usize {
        self.max
    }
}
