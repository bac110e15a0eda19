//! [`RingLink`]: a `shmem-ring` channel as a link, the transport between
//! kernels of one machine. It owns the channel's two halves; the window and
//! the endpoint (and its heartbeat) belong to the caller.

use std::time::Duration;

use super::{Link, LinkError};

/// How long an agent's receives spin: not at all. An agent runs a receiving
/// thread per link, the DSM engine and the local socket's threads, more than
/// a kernel's CPUs; a spinning receiver keeps the CPU from the thread whose
/// answer it waits for. Measured with `cargo bench -p mknode --bench dsm`
/// on 2 vCPUs: a remote read fault took ~150 µs with the ring's default
/// 50 µs spin and ~40 µs yielding at once; `cargo bench -p mknode --bench
/// link` shows what yielding costs a lone pair of threads.
pub const AGENT_SPIN: Duration = Duration::ZERO;

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

    /// Opens `endpoint`'s channel to `peer` as a link whose receives yield
    /// the CPU from the start instead of spinning first ([`AGENT_SPIN`]).
    pub fn open(endpoint: &shmem_ring::Endpoint, peer: u16) -> Result<RingLink, shmem_ring::Error> {
        let (tx, rx) = endpoint.channel(peer)?;
        Ok(RingLink::new(tx, rx).spinning(AGENT_SPIN))
    }

    /// This link with receives that spin for `spin` before they yield (see
    /// `shmem_ring::Receiver::set_spin`): worth it only when the receiving
    /// thread has a CPU of its own.
    pub fn spinning(self, spin: Duration) -> RingLink {
        self.rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_spin(spin);
        self
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

    fn try_send(&self, msg: &[u8]) -> Result<bool, LinkError> {
        // Another thread's send may be waiting for room: do not queue behind it.
        let Ok(mut tx) = self.tx.try_lock() else {
            return Ok(false);
        };
        match tx.try_send(msg) {
            Ok(()) => Ok(true),
            Err(shmem_ring::Error::Full { .. }) => Ok(false),
            Err(e) => Err(ring_error(e, Duration::ZERO)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::conformance;

    fn ring_pair() -> (shmem_ring::Endpoint, shmem_ring::Endpoint) {
        let w =
            shmem_ring::Window::anonymous(shmem_ring::Layout::with_capacity(2, 256 << 10).unwrap())
                .unwrap();
        (w.attach(0).unwrap(), w.attach(1).unwrap())
    }

    #[test]
    fn try_send_sends_whole_messages_until_the_ring_is_full_then_says_later() {
        let (e0, e1) = ring_pair();
        let a = RingLink::open(&e0, 1).unwrap();
        let b = RingLink::open(&e1, 0).unwrap();
        let msg = vec![7u8; 4000];
        let mut sent = 0u32;
        while a.try_send(&msg).unwrap() {
            sent += 1;
            assert!(sent < 100_000, "the ring never filled");
        }
        assert!(sent > 0);
        let mut buf = Vec::new();
        for _ in 0..sent {
            assert!(b.recv(&mut buf, Duration::from_secs(1)).unwrap());
            assert_eq!(buf, msg);
        }
        assert!(
            !b.recv(&mut buf, Duration::from_millis(1)).unwrap(),
            "a part was sent"
        );
        assert!(a.try_send(&msg).unwrap(), "room again once read");
    }

    #[test]
    fn ringlink_conformance() {
        let (e0, e1) = ring_pair();
        let a = RingLink::open(&e0, 1).unwrap();
        let b = RingLink::open(&e1, 0).unwrap();
        conformance::order_and_content(&a, &b, 50_000);
        conformance::timeouts_and_limits(&a, &b);
        // The peer's kernel leaves: its link, then its endpoint go.
        conformance::peer_gone(&a, b, move || drop(e1));
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
}
