//! A `Link` is a duplex, ordered, message-preserving connection to one peer
//! agent. The agent speaks only to this trait; this module owns the trait,
//! its errors, the transports under it and the checks they all pass. It
//! knows no message kinds (those are `wire`'s) and no peers' names.
//!
//! Transports:
//! - [`RingLink`] (`ring.rs`): a `shmem-ring` channel, between kernels of
//!   one machine; a peer that stops is [`LinkError::PeerDown`] and the link
//!   stays, since the peer may attach again.
//! - [`TcpLink`] (`tcp.rs`): length-prefixed frames over a TCP connection,
//!   with a small handshake ([`tcp::listen`], [`tcp::connect`]) that tells
//!   each side the other's endpoint id. The transport Popcorn Linux used,
//!   here to compare the rings against and to span machines. A closed
//!   connection is [`LinkError::PeerGone`], for good: a peer that comes
//!   back connects again and becomes a new link.
//! - [`MemLink`] (`mem.rs`): an in-process pair, for the agent's unit tests.
//!
//! Every implementation must pass the same conformance checks
//! ([`conformance`]): order, content, message boundaries, timeouts and
//! limits, and a clear error once the peer is gone.
//!
//! ## What they cost
//!
//! `cargo bench -p mknode --bench link` (two processes pinned to the two
//! vCPUs of the test machine, the links alternating in one run; medians of
//! 21 rounds, ratios per round against the ring):
//!
//! | link                  | one-way 64 B | 64 B msg/s | 4 KiB msg/s |
//! |-----------------------|-------------:|-----------:|------------:|
//! | `RingLink` (/dev/shm) |       225 ns |     23.5 M |      5.04 M |
//! | `TcpLink`, blocking   | 30.3 µs (×128) | 170 k (×0.007) | 141 k (×0.028) |
//! | `TcpLink`, busy-poll  |  4.9 µs (×22) | 200 k (×0.009) | 176 k (×0.034) |
//!
//! Raw TCP over loopback (shmem-ring's bench, same machine) does about the
//! same (24 µs / 4.7 µs, 0.18 M/s, 0.15 M/s): the framing costs little; a
//! TCP message costs a system call and a pass through the stack on each
//! side, and a blocking one a wake-up of a halted vCPU (~25 µs) as well.
//! Busy-polling removes the wake-up (6× lower latency) but not the
//! per-message send cost, so it barely raises throughput.

use std::time::Duration;

mod mem;
mod ring;
pub mod tcp;

pub use mem::MemLink;
pub use ring::{RingLink, AGENT_SPIN};
pub use tcp::TcpLink;

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
    /// Sends one message if that needs no wait (room at once, nobody else
    /// sending): `Ok(true)` when sent, `Ok(false)` when the caller should
    /// [`Link::send`] later from a thread that may block. Never sends part
    /// of a message. The default cannot tell, so it always says later.
    fn try_send(&self, _msg: &[u8]) -> Result<bool, LinkError> {
        Ok(false)
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

    /// An empty link times out instead of blocking forever, a message over
    /// the limit is refused whole, and one of exactly the limit (and an
    /// empty one) arrives whole.
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
        let t = Duration::from_secs(10);
        let largest: Vec<u8> = (0..a.max_message()).map(|i| (i % 253) as u8).collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                a.send(&largest, t).expect("send the largest message");
                a.send(&[], t).expect("send an empty message");
            });
            assert!(b.recv(&mut buf, t).expect("recv"), "the largest message");
            assert!(buf == largest, "the largest message arrived changed");
            assert!(b.recv(&mut buf, t).expect("recv"), "the empty message");
            assert!(buf.is_empty(), "the empty message arrived as {buf:?}");
        });
    }

    /// A peer that ends (`peer` is dropped, then `end` runs: what else the
    /// transport needs to see it go) is reported as such: the messages it
    /// sent first still arrive, in order, then `recv` fails with
    /// [`LinkError::PeerGone`] or [`LinkError::PeerDown`] within a few
    /// seconds, never [`LinkError::Broken`] and never silence for ever.
    pub fn peer_gone<L: Link>(a: &dyn Link, peer: L, end: impl FnOnce()) {
        let t = Duration::from_secs(5);
        for i in 0u64..3 {
            peer.send(&i.to_le_bytes(), t).expect("send before leaving");
        }
        drop(peer);
        end();
        let mut buf = Vec::new();
        for i in 0u64..3 {
            assert!(a.recv(&mut buf, t).expect("a message sent before leaving"));
            assert_eq!(buf, i.to_le_bytes(), "message {i} sent before leaving");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match a.recv(&mut buf, Duration::from_millis(50)) {
                Err(LinkError::PeerGone(_) | LinkError::PeerDown { .. }) => return,
                Ok(false) => assert!(
                    std::time::Instant::now() < deadline,
                    "the peer left 10 s ago and the link still says nothing"
                ),
                other => panic!("after the peer left: {other:?}"),
            }
        }
    }
}
