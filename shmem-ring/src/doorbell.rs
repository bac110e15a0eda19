//! Doorbells: how a receiver that went to sleep on an empty ring is woken.
//!
//! The protocol is the ring's (`ring.rs`, "The doorbell"): the receiver
//! announces its sleep in the ring's doorbell word and looks once more; a
//! sender that publishes and finds the word saying "asleep" takes the
//! announcement back and rings. This module is the part that differs from
//! one pair of kernels to another, behind one trait:
//!
//! - [`FutexBell`]: both sides on one kernel (processes or threads mapping
//!   the same file): `FUTEX_WAIT` / `FUTEX_WAKE` on the doorbell word itself,
//!   shared (not `FUTEX_PRIVATE`), so it works across processes. This is
//!   what [`crate::Window::attach`] gives.
//! - across kernels a futex cannot reach the other side; there the doorbell
//!   is a message on some channel the two kernels share (a virtio-serial port
//!   relayed by the host for QEMU guests, AF_VSOCK on a multikernel kernel),
//!   implemented outside this crate against the same trait.
//! - none ([`crate::Window::attach_with_doorbell`] with `None`): receivers
//!   never announce a sleep and poll with timed back-off, as before the
//!   doorbell; senders never ring them.
//!
//! The doorbell is an optimisation of waiting, never of correctness: a
//! receiver also wakes by itself every so often to look at its peer's
//! liveness, so a ring that got lost on its way (a relay restarting) costs
//! latency, not a message.

use std::fmt;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::raw::Region;
use crate::ring::BELL_ASLEEP;

/// How a ring's receiver is woken from a sleep it announced. One value per
/// endpoint serves all of its rings: [`Doorbell::ring`] for the rings it
/// sends on, [`Doorbell::wait`] for those it receives on.
pub trait Doorbell: Send + Sync + fmt::Debug {
    /// Wakes the receiver of `bell`'s ring. Called by the ring's sender once
    /// per announced sleep, after it set the doorbell word back to awake.
    /// Must not block for long (it runs on the sender's path); a ring that
    /// cannot be delivered may be dropped.
    fn ring(&self, bell: &Bell);

    /// Sleeps until `bell`'s ring is rung after this call began, until
    /// [`Bell::asleep`] no longer holds, or until `deadline`; may return
    /// earlier (spuriously). Called by the ring's receiver after it
    /// announced its sleep and found the ring still empty. It must not
    /// sleep through a ring that came between the announcement and this
    /// call: checking [`Bell::asleep`] after arming whatever the ring will
    /// trigger is enough, since the sender clears the word before it rings.
    ///
    /// An error says this doorbell cannot wait here at all (a futex on a
    /// mapping that does not support one, say): the receiver then falls back
    /// to timed polling for good and stops announcing its sleeps.
    fn wait(&self, bell: &Bell, deadline: Instant) -> io::Result<()>;
}

/// The doorbell word of one ring (`from -> to`) in a window: what a
/// [`Doorbell`] rings and waits on. Cheap to clone; it keeps the mapping.
#[derive(Clone)]
pub struct Bell {
    region: Arc<Region>,
    off: usize,
    from: u16,
    to: u16,
}

impl fmt::Debug for Bell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bell")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("offset", &format_args!("{:#x}", self.off))
            .finish()
    }
}

impl Bell {
    /// The doorbell word at `off` of ring `from -> to`, if it lies inside
    /// the window.
    pub(crate) fn new(region: Arc<Region>, off: usize, from: u16, to: u16) -> Option<Bell> {
        region.word(off)?;
        Some(Bell {
            region,
            off,
            from,
            to,
        })
    }

    /// The sending endpoint of the ring.
    pub fn from(&self) -> u16 {
        self.from
    }

    /// The receiving endpoint of the ring (the one that sleeps).
    pub fn to(&self) -> u16 {
        self.to
    }

    /// Whether the receiver announced that it sleeps and no sender has
    /// taken the announcement back yet.
    pub fn asleep(&self) -> bool {
        self.region
            .word(self.off)
            .is_some_and(|w| w.load(Ordering::Acquire) == BELL_ASLEEP)
    }

    /// `FUTEX_WAIT` on the word while it says asleep, up to `deadline`
    /// (same-kernel doorbells; see [`FutexBell`]).
    pub fn futex_wait(&self, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        // BELL_ASLEEP is 1: it fits the futex word (the low half).
        self.region.futex_wait(self.off, BELL_ASLEEP as u32, left)
    }

    /// `FUTEX_WAKE` on the word: wakes a receiver of this kernel sleeping in
    /// [`Bell::futex_wait`] (a relay calls it for a ring that came from
    /// another kernel).
    pub fn futex_wake(&self) -> io::Result<()> {
        self.region.futex_wake(self.off)
    }
}

/// The doorbell of peers on one kernel: a futex on the doorbell word in the
/// shared mapping. A ring is one `FUTEX_WAKE`, a wait one `FUTEX_WAIT` that
/// the kernel skips when the word already says awake, so no ring is lost
/// between the receiver's last look and its sleep. Fails to wait on
/// mappings the kernel cannot key a shared futex on (a PCI BAR or `/dev/mem`
/// inside a guest: `EFAULT`), and then receivers fall back to polling.
#[derive(Clone, Copy, Debug, Default)]
pub struct FutexBell;

impl Doorbell for FutexBell {
    fn ring(&self, bell: &Bell) {
        // Nothing to do about a failure here: the receiver's own wake-ups
        // (to look at its peer's liveness) still find the message.
        let _ = bell.futex_wake();
    }

    fn wait(&self, bell: &Bell, deadline: Instant) -> io::Result<()> {
        bell.futex_wait(deadline)
    }
}

/// A ring as relays carry it between kernels (a guest's virtio-serial
/// port and the host daemon, for instance): which ring's receiver to wake.
/// Four bytes on the wire: a magic byte, the sending and the receiving
/// endpoint ids (below [`crate::MAX_ENDPOINTS`], so one byte each) and a
/// check byte, so a reader of a byte stream that lost its place finds the
/// next record again instead of misreading every one after it.
///
/// A receiver may only sleep long on a sender that rings: one whose kernel
/// has no doorbell (a guest whose kernel could not load the port's driver)
/// never does. So a relay asks each kernel ([`RingMsg::QUERY`]) and those
/// that ring answer ([`RingMsg::hello`]); the relay then rings, once, every
/// receiver of a kernel that answered on behalf of every other that did,
/// which is how each kernel learns whom it may sleep on. Until a sender is
/// known to ring, a receiver waits for it no longer than a poll would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingMsg {
    /// The ring's sender.
    pub from: u16,
    /// The ring's receiver: the endpoint to wake.
    pub to: u16,
}

impl RingMsg {
    /// Bytes of one record.
    pub const LEN: usize = 4;
    const MAGIC: u8 = 0xDB;

    fn check(from: u8, to: u8) -> u8 {
        Self::MAGIC ^ from.rotate_left(3) ^ to ^ 0x5A
    }

    /// The relay's question to a kernel that just got its end of the
    /// channel: does it ring? (`from` = `to` = 0: no ring looks like it,
    /// endpoint 0 never rings itself.)
    pub const QUERY: RingMsg = RingMsg { from: 0, to: 0 };

    /// A kernel's answer to [`RingMsg::QUERY`]: endpoint `id` rings the
    /// receivers it sends to, so they may sleep until it does.
    pub fn hello(id: u16) -> RingMsg {
        RingMsg { from: id, to: id }
    }

    /// Whether this is [`RingMsg::QUERY`].
    pub fn is_query(self) -> bool {
        self == Self::QUERY
    }

    /// Whether this is a [`RingMsg::hello`] (of `from`).
    pub fn is_hello(self) -> bool {
        self.from == self.to && self.from != 0
    }

    /// The record for the ring of `bell`.
    pub fn of(bell: &Bell) -> RingMsg {
        RingMsg {
            from: bell.from(),
            to: bell.to(),
        }
    }

    /// The four bytes; `None` for ids that no window has (256 and up).
    pub fn encode(self) -> Option<[u8; Self::LEN]> {
        let from = u8::try_from(self.from).ok()?;
        let to = u8::try_from(self.to).ok()?;
        Some([Self::MAGIC, from, to, Self::check(from, to)])
    }

    /// Takes every whole record off the front of `buf`, leaving a partial
    /// one for the next read. Bytes that do not start a valid record are
    /// skipped one at a time; returns the records and how many bytes were
    /// skipped.
    pub fn drain(buf: &mut Vec<u8>) -> (Vec<RingMsg>, usize) {
        let mut out = Vec::new();
        let mut skipped = 0;
        let mut i = 0;
        while buf.len() - i >= Self::LEN {
            let r = &buf[i..i + Self::LEN];
            if r[0] == Self::MAGIC && r[3] == Self::check(r[1], r[2]) {
                out.push(RingMsg {
                    from: u16::from(r[1]),
                    to: u16::from(r[2]),
                });
                i += Self::LEN;
            } else {
                skipped += 1;
                i += 1;
            }
        }
        buf.drain(..i);
        (out, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_records_round_trip_and_resynchronise() {
        let a = RingMsg { from: 1, to: 2 }.encode().unwrap();
        let b = RingMsg { from: 63, to: 0 }.encode().unwrap();
        assert_eq!(RingMsg { from: 256, to: 0 }.encode(), None);
        assert!(RingMsg::QUERY.is_query() && !RingMsg::QUERY.is_hello());
        assert!(RingMsg::hello(3).is_hello() && !RingMsg::hello(3).is_query());
        assert!(!RingMsg { from: 1, to: 2 }.is_hello());
        // Two records, garbage in between, and half a record at the end.
        let mut buf = a.to_vec();
        buf.extend_from_slice(&[0xDB, 7, 7]);
        buf.extend_from_slice(&b);
        buf.extend_from_slice(&a[..2]);
        let (got, skipped) = RingMsg::drain(&mut buf);
        assert_eq!(
            got,
            [RingMsg { from: 1, to: 2 }, RingMsg { from: 63, to: 0 }]
        );
        assert_eq!(skipped, 3);
        assert_eq!(buf, a[..2]);
        buf.extend_from_slice(&a[2..]);
        assert_eq!(RingMsg::drain(&mut buf).0, [RingMsg { from: 1, to: 2 }]);
        assert!(buf.is_empty());
        // A flipped bit in the check is not a record.
        let mut bad = a.to_vec();
        bad[3] ^= 1;
        assert_eq!(RingMsg::drain(&mut bad).0, []);
    }
}
