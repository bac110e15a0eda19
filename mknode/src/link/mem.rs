//! [`MemLink`]: two ends of a link inside one process, over crossbeam
//! channels. The reference implementation the agent's unit tests run on;
//! it owns nothing but the two channels.

use std::time::Duration;

use super::{Link, LinkError};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::conformance;

    #[test]
    fn memlink_conformance() {
        let (a, b) = MemLink::pair(64, 64 * 1024);
        conformance::order_and_content(&a, &b, 20_000);
        conformance::timeouts_and_limits(&a, &b);
    }

    #[test]
    fn memlink_peer_gone() {
        let (a, b) = MemLink::pair(4, 1024);
        conformance::peer_gone(&a, b, || {});
        let (a, b) = MemLink::pair(4, 1024);
        drop(b);
        assert!(matches!(
            a.send(b"x", Duration::from_millis(10)),
            Err(LinkError::PeerGone(_))
        ));
    }
}
