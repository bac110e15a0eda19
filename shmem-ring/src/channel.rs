//! The two halves of a channel ([`Sender`], [`Receiver`]), their zero-copy
//! slots, and blocking with a timeout and a watch on the peer's liveness.
//!
//! The index protocol itself is in `ring.rs`; this module binds it to a ring
//! in the window, enforces one sender and one receiver per ring, and turns the
//! protocol's outcomes into [`Error`]s that name the ring.

use std::hint::spin_loop;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crate::doorbell::{Bell, Doorbell};
use crate::error::Corruption;
use crate::layout::{self, RingOffsets, FLAG_BROKEN};
use crate::peer::{EndpointInner, PeerState, PeerStatus, PeerWatch};
use crate::raw::{Lease, RingArea, RingPlace};
use crate::ring::{Consumer, Frame, Producer, Reservation, RingMem, TryError};
use crate::wait::{Waiter, LOOK_EVERY, SPIN_FOR};
use crate::Error;

/// Polls a blocking receive makes inline before it sets up a waiter (about
/// 1.5 µs of pauses here).
const SPIN_INLINE: u32 = 64;

/// A ring in the window, as the index protocol sees it.
#[derive(Debug)]
pub(crate) struct WindowRing {
    area: RingArea,
    own_flags: usize,
    peer_flags: usize,
    /// The ring's doorbell word, and the endpoint's doorbell that rings it
    /// (sender) or sleeps on it (receiver).
    bell: Bell,
    doorbell: Option<Arc<dyn Doorbell>>,
}

impl RingMem for WindowRing {
    #[inline(always)]
    fn capacity(&self) -> u64 {
        self.area.capacity() as u64
    }
    fn load_tail(&self, order: Ordering) -> u64 {
        self.area.tail().load(order)
    }
    #[inline(always)]
    fn store_tail(&self, value: u64, order: Ordering) {
        self.area.tail().store(value, order);
    }
    #[inline(always)]
    fn load_word(&self, pos: u64, order: Ordering) -> u64 {
        self.area.data_word(pos).load(order)
    }
    #[inline(always)]
    fn store_word(&self, pos: u64, value: u64, order: Ordering) {
        self.area.data_word(pos).store(value, order);
    }
    #[inline(always)]
    fn write_payload(&self, off: u64, src: &[u8]) {
        let ok = self.area.copy_in(off as usize, src);
        debug_assert!(ok, "reservations never wrap");
    }
    #[inline(always)]
    fn read_payload(&self, off: u64, len: usize, dst: &mut Vec<u8>) {
        let ok = self.area.append_to(off as usize, len, dst);
        debug_assert!(ok, "validated frames never wrap");
    }
    #[inline(always)]
    fn prefetch(&self, pos: u64) {
        self.area.prefetch(pos);
    }
    fn peer_flagged(&self) -> bool {
        self.area
            .region()
            .word(self.peer_flags)
            .is_some_and(|w| w.load(Ordering::Relaxed) & FLAG_BROKEN != 0)
    }
    fn flag_broken(&self) {
        if let Some(w) = self.area.region().word(self.own_flags) {
            w.fetch_or(FLAG_BROKEN, Ordering::Relaxed);
        }
    }
    #[inline(always)]
    fn load_bell(&self, order: Ordering) -> u64 {
        self.area.bell().load(order)
    }
    fn store_bell(&self, value: u64, order: Ordering) {
        self.area.bell().store(value, order);
    }
    fn swap_bell(&self, current: u64, new: u64) -> bool {
        self.area
            .bell()
            .compare_exchange(current, new, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
    fn ring_bell(&self) {
        if let Some(d) = &self.doorbell {
            d.ring(&self.bell);
        }
    }
}

fn offset(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// One half held by this process: registered in the window's process-local
/// table and stamped into the ring's claim word, both undone on drop.
#[derive(Debug)]
struct Hold {
    endpoint: Arc<EndpointInner>,
    key: (u64, bool),
    claim: usize,
}

impl Hold {
    fn take(
        endpoint: &Arc<EndpointInner>,
        ring: RingOffsets,
        (from, to): (u16, u16),
    ) -> Result<Hold, Error> {
        let sender = from == endpoint.id;
        let key = (ring.data, sender);
        let inner = endpoint.window.inner();
        let mut held = inner.held.lock().unwrap_or_else(PoisonError::into_inner);
        if !held.insert(key) {
            return Err(Error::AlreadyClaimed {
                role: if sender { "sender" } else { "receiver" },
                from,
                to,
            });
        }
        let claim = offset(ring.control)
            + if sender {
                layout::C_PRODUCER_CLAIM as usize
            } else {
                layout::C_CONSUMER_CLAIM as usize
            };
        if let Some(w) = inner.region.word(claim) {
            w.store(endpoint.generation, Ordering::Relaxed);
        }
        Ok(Hold {
            endpoint: Arc::clone(endpoint),
            key,
            claim,
        })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let inner = self.endpoint.window.inner();
        if let Some(w) = inner.region.word(self.claim) {
            let _ = w.compare_exchange(
                self.endpoint.generation,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

fn window_ring(
    endpoint: &EndpointInner,
    from: u16,
    to: u16,
) -> Result<(RingOffsets, WindowRing), Error> {
    let layout = endpoint.window.layout();
    let ring = layout.ring(from, to).ok_or(Error::NoSuchEndpoint {
        id: from.max(to),
        endpoints: layout.endpoints(),
    })?;
    let control = offset(ring.control);
    let place = RingPlace {
        tail: control + layout::C_TAIL as usize,
        bell: control + layout::C_BELL as usize,
        data: offset(ring.data),
        capacity: offset(ring.capacity),
    };
    let region = Arc::clone(&endpoint.window.inner().region);
    let out_of_bounds = || Error::OutOfBounds {
        offset: ring.data,
        len: ring.capacity,
        size: endpoint.window.inner().region.len() as u64,
    };
    let bell = Bell::new(Arc::clone(&region), place.bell, from, to).ok_or_else(out_of_bounds)?;
    let area = RingArea::new(region, place).ok_or_else(out_of_bounds)?;
    let producer_flags = control + layout::C_PRODUCER_FLAGS as usize;
    let consumer_flags = control + layout::C_CONSUMER_FLAGS as usize;
    let sender_side = from == endpoint.id;
    let (own_flags, peer_flags) = if sender_side {
        (producer_flags, consumer_flags)
    } else {
        (consumer_flags, producer_flags)
    };
    Ok((
        ring,
        WindowRing {
            area,
            own_flags,
            peer_flags,
            bell,
            doorbell: endpoint.doorbell.clone(),
        },
    ))
}

/// Clears both rings between `endpoint` and `peer` (see
/// [`crate::Endpoint::reset_channel`]).
pub(crate) fn reset(endpoint: &EndpointInner, peer: u16) -> Result<(), Error> {
    let inner = endpoint.window.inner();
    let held = inner.held.lock().unwrap_or_else(PoisonError::into_inner);
    let mut rings = Vec::with_capacity(2);
    for (from, to) in [(endpoint.id, peer), (peer, endpoint.id)] {
        let (ring, _) = window_ring(endpoint, from, to)?;
        for sender in [true, false] {
            if held.contains(&(ring.data, sender)) {
                return Err(Error::AlreadyClaimed {
                    role: if sender { "sender" } else { "receiver" },
                    from,
                    to,
                });
            }
        }
        rings.push(ring);
    }
    for ring in rings {
        // Positions restart at 0: the word there must read as "no frame yet"
        // (the ring protocol's marker), whatever the old frames left in it.
        if let Some(w) = inner.region.word(offset(ring.data)) {
            w.store(0, Ordering::Relaxed);
        }
        for word in [
            layout::C_PRODUCER_CLAIM,
            layout::C_PRODUCER_FLAGS,
            layout::C_TAIL,
            layout::C_CONSUMER_CLAIM,
            layout::C_CONSUMER_FLAGS,
            layout::C_BELL,
        ] {
            if let Some(w) = inner.region.word(offset(ring.control + word)) {
                w.store(0, Ordering::Release);
            }
        }
    }
    Ok(())
}

/// What a blocking call found when it looked up from waiting.
fn look_up(
    endpoint: &EndpointInner,
    watch: &mut PeerWatch,
    (peer, progress): (u16, u64),
    now: Instant,
    timeout: Duration,
    waiter: &Waiter,
    (from, to): (u16, u16),
) -> Result<(), Error> {
    endpoint.check_current()?;
    let words = endpoint.entry_words(peer);
    let status = watch.observe(peer, words, progress, now, &endpoint.liveness);
    match status.state {
        PeerState::Dead => {
            return Err(Error::PeerDead {
                peer,
                quiet: status.quiet,
            })
        }
        PeerState::Gone => return Err(Error::PeerGone { peer }),
        PeerState::Absent | PeerState::Alive | PeerState::Silent => {}
    }
    let waited = now.saturating_duration_since(waiter.start());
    if waited >= timeout {
        return Err(Error::Timeout { from, to, waited });
    }
    Ok(())
}

/// The sending half of a channel: the only producer of ring `from -> to`.
///
/// Frames sent with the `*_batched` calls or committed with
/// [`SendSlot::commit_batched`] become visible together at the next
/// [`Sender::flush`] (or any non-batched send or commit), so a burst costs the
/// receiver one cache-line transfer of the write position. Dropping a sender
/// flushes it.
#[derive(Debug)]
pub struct Sender {
    producer: Producer<WindowRing>,
    watch: PeerWatch,
    peer: u16,
    hold: Hold,
}

impl Sender {
    pub(crate) fn open(endpoint: Arc<EndpointInner>, peer: u16) -> Result<Sender, Error> {
        let (ring, mem) = window_ring(&endpoint, endpoint.id, peer)?;
        let hold = Hold::take(&endpoint, ring, (endpoint.id, peer))?;
        Ok(Sender {
            producer: Producer::new(mem),
            watch: PeerWatch::new(),
            peer,
            hold,
        })
    }

    /// The producing endpoint (this side).
    pub fn from(&self) -> u16 {
        self.hold.endpoint.id
    }

    /// The consuming endpoint (the peer).
    pub fn to(&self) -> u16 {
        self.peer
    }

    /// Largest message this ring accepts.
    pub fn max_message(&self) -> usize {
        usize::try_from(self.producer.max_payload()).unwrap_or(usize::MAX)
    }

    /// Why this ring is broken, if it is; a broken ring stays broken.
    pub fn broken(&self) -> Option<Corruption> {
        self.producer.broken()
    }

    fn error(&self, e: TryError) -> Error {
        let (from, to) = (self.from(), self.to());
        match e {
            TryError::Full => Error::Full { from, to },
            TryError::Empty => Error::Empty { from, to },
            TryError::TooLarge { len, max } => Error::TooLarge { len, max },
            TryError::Broken(cause) => Error::Broken { from, to, cause },
        }
    }

    #[inline(always)]
    fn put(&mut self, msg: &[u8], publish: bool) -> Result<(), TryError> {
        self.producer.send(msg, publish)
    }

    /// Sends `msg` as one frame and publishes it, or fails at once with
    /// [`Error::Full`] (retry later), [`Error::TooLarge`] or [`Error::Broken`].
    pub fn try_send(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.put(msg, true).map_err(|e| self.error(e))
    }

    /// Like [`Sender::try_send`] but leaves the frame unpublished until the
    /// next [`Sender::flush`]. When the ring is full, what was batched is
    /// published before `Full` is returned, so the receiver can make room.
    pub fn try_send_batched(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.put(msg, false).map_err(|e| self.error(e))
    }

    /// Publishes every batched frame with one store.
    pub fn flush(&mut self) {
        self.producer.publish();
    }

    /// Whether batched frames are waiting for [`Sender::flush`].
    pub fn has_unflushed(&self) -> bool {
        self.producer.has_unpublished()
    }

    /// Sends `msg`, waiting up to `timeout` for room (spin, yield, then sleep).
    /// Fails with [`Error::Timeout`] when the time is up, [`Error::PeerDead`]
    /// or [`Error::PeerGone`] when the receiver stopped, [`Error::Superseded`]
    /// when this endpoint was attached again elsewhere.
    pub fn send(&mut self, msg: &[u8], timeout: Duration) -> Result<(), Error> {
        self.send_inner(msg, timeout, true)
    }

    /// [`Sender::send`] without publishing (see [`Sender::try_send_batched`]).
    pub fn send_batched(&mut self, msg: &[u8], timeout: Duration) -> Result<(), Error> {
        self.send_inner(msg, timeout, false)
    }

    fn send_inner(&mut self, msg: &[u8], timeout: Duration, publish: bool) -> Result<(), Error> {
        match self.producer.send(msg, publish) {
            Err(TryError::Full) => {}
            other => return other.map_err(|e| self.error(e)),
        }
        let r = self.reserve_inner(msg.len(), timeout)?;
        self.producer.fill(&r, msg);
        self.producer.commit_with(r, publish);
        Ok(())
    }

    fn reserve_inner(&mut self, len: usize, timeout: Duration) -> Result<Reservation, Error> {
        // The fast path reads no clock (~25 ns, a good part of a hop).
        match self.producer.try_reserve(len) {
            Ok(r) => return Ok(r),
            Err(TryError::Full) => {}
            Err(e) => return Err(self.error(e)),
        }
        let mut waiter = Waiter::new();
        loop {
            if let Some(now) = waiter.pause() {
                let ring = (self.from(), self.to());
                let progress = self.progress();
                if let Err(e) = look_up(
                    &self.hold.endpoint,
                    &mut self.watch,
                    (self.peer, progress),
                    now,
                    timeout,
                    &waiter,
                    ring,
                ) {
                    // The receiver may have made room just before it left.
                    return self.producer.try_reserve(len).map_err(|_| e);
                }
            }
            match self.producer.try_reserve(len) {
                Ok(r) => return Ok(r),
                Err(TryError::Full) => {}
                Err(e) => return Err(self.error(e)),
            }
        }
    }

    fn slot(&mut self, r: Reservation) -> Result<SendSlot<'_>, Error> {
        let lease = self.producer.mem().area.lease(
            r.payload_offset(self.producer.mem().capacity()) as usize,
            r.len(),
        );
        match lease {
            Some(lease) => Ok(SendSlot {
                sender: self,
                res: r,
                lease,
            }),
            // Unreachable: reservations never run past the data area.
            None => Err(Error::OutOfBounds {
                offset: r.payload_offset(self.producer.mem().capacity()),
                len: r.len() as u64,
                size: self.producer.mem().capacity(),
            }),
        }
    }

    /// Reserves room for a `len`-byte message to fill in place (zero copy).
    /// Nothing is visible to the receiver until [`SendSlot::commit`]; a slot
    /// dropped without commit is abandoned.
    pub fn try_reserve(&mut self, len: usize) -> Result<SendSlot<'_>, Error> {
        let r = self.producer.try_reserve(len).map_err(|e| self.error(e))?;
        self.slot(r)
    }

    /// [`Sender::try_reserve`], waiting up to `timeout` for room.
    pub fn reserve(&mut self, len: usize, timeout: Duration) -> Result<SendSlot<'_>, Error> {
        let r = self.reserve_inner(len, timeout)?;
        self.slot(r)
    }

    /// The receiving peer's state, as this sender has watched it (its
    /// heartbeat, or the receiver making room, count as signs of life).
    pub fn peer_status(&mut self) -> PeerStatus {
        let words = self.hold.endpoint.entry_words(self.peer);
        let liveness = self.hold.endpoint.liveness;
        let progress = self.progress();
        self.watch
            .observe(self.peer, words, progress, Instant::now(), &liveness)
    }

    /// How far the receiver has read, as last seen.
    fn progress(&self) -> u64 {
        self.producer.seen_tail()
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.producer.publish();
    }
}

/// Room for one message inside the ring, filled in place. `DerefMut<[u8]>` of
/// exactly the reserved length.
#[derive(Debug)]
pub struct SendSlot<'a> {
    sender: &'a mut Sender,
    res: Reservation,
    lease: Lease,
}

impl SendSlot<'_> {
    /// Commits the message and publishes it (with everything batched before).
    pub fn commit(self) {
        let SendSlot { sender, res, .. } = self;
        sender.producer.commit_with(res, true);
    }

    /// Commits the message without publishing it (see [`Sender::flush`]).
    pub fn commit_batched(self) {
        let SendSlot { sender, res, .. } = self;
        sender.producer.commit(res);
    }
}

impl Deref for SendSlot<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.sender.producer.mem().area.bytes(&self.lease)
    }
}

impl DerefMut for SendSlot<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.sender.producer.mem().area.bytes_mut(&mut self.lease)
    }
}

/// The receiving half of a channel: the only consumer of ring `from -> to`.
#[derive(Debug)]
pub struct Receiver {
    consumer: Consumer<WindowRing>,
    watch: PeerWatch,
    peer: u16,
    hold: Hold,
    /// How long blocking receives have waited in a row without a message:
    /// an idle receiver polls less often (`Waiter::after_idle`).
    idle: Duration,
    /// Whether this receiver sleeps on its endpoint's doorbell once spinning
    /// is over (it has one, and its wait has not failed); else it sleeps
    /// with timed back-off.
    dozes: bool,
    /// Longest doze before a look at the peer's liveness.
    look_every: Duration,
    /// How long a blocking receive spins before it yields ([`SPIN_FOR`]
    /// unless set with [`Receiver::set_spin`]).
    spin: Duration,
}

impl Receiver {
    pub(crate) fn open(endpoint: Arc<EndpointInner>, peer: u16) -> Result<Receiver, Error> {
        let (ring, mem) = window_ring(&endpoint, peer, endpoint.id)?;
        let hold = Hold::take(&endpoint, ring, (peer, endpoint.id))?;
        let dozes = endpoint.doorbell.is_some();
        let look_every = LOOK_EVERY.min(endpoint.liveness.dead_after / 4);
        let consumer = Consumer::new(mem);
        // An announcement a crashed predecessor left would make the sender
        // ring for nothing once.
        consumer.awake();
        Ok(Receiver {
            consumer,
            watch: PeerWatch::new(),
            peer,
            hold,
            idle: Duration::ZERO,
            dozes,
            look_every,
            spin: SPIN_FOR,
        })
    }

    /// How long a blocking receive spins before it starts yielding the CPU
    /// (then it sleeps, see [`crate::wait`]); [`SPIN_FOR`] by default. Zero
    /// for a receiver in a process with more busy threads than CPUs: there,
    /// spinning keeps the CPU from the very thread it waits for (an agent
    /// whose DSM hands each fault over four threads: a remote read fault
    /// took ~150 µs with 50 µs spins and ~40 µs yielding at once, on 2
    /// vCPUs; `cargo bench -p mknode --bench dsm`). Yielding costs a system
    /// call per poll when nothing else wants the CPU.
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// The producing endpoint (the peer).
    pub fn from(&self) -> u16 {
        self.peer
    }

    /// The consuming endpoint (this side).
    pub fn to(&self) -> u16 {
        self.hold.endpoint.id
    }

    /// Why this ring is broken, if it is; a broken ring stays broken.
    pub fn broken(&self) -> Option<Corruption> {
        self.consumer.broken()
    }

    fn error(&self, e: TryError) -> Error {
        let (from, to) = (self.from(), self.to());
        match e {
            TryError::Full => Error::Full { from, to },
            TryError::Empty => Error::Empty { from, to },
            TryError::TooLarge { len, max } => Error::TooLarge { len, max },
            TryError::Broken(cause) => Error::Broken { from, to, cause },
        }
    }

    #[inline(always)]
    fn take(&mut self, f: Frame, buf: &mut Vec<u8>) -> usize {
        buf.clear();
        self.consumer.read(&f, buf);
        self.consumer.release(f);
        buf.len()
    }

    /// Moves the next message into `buf` (replacing its contents) and returns
    /// its length, or fails at once with [`Error::Empty`] (retry later) or
    /// [`Error::Broken`].
    pub fn try_recv(&mut self, buf: &mut Vec<u8>) -> Result<usize, Error> {
        match self.consumer.poll() {
            Ok(f) => Ok(self.take(f, buf)),
            Err(e) => Err(self.not_taken(e)),
        }
    }

    /// Why `poll` gave nothing; when the ring is empty, also whether the
    /// producer flagged it.
    #[cold]
    fn not_taken(&mut self, e: TryError) -> Error {
        let e = match e {
            TryError::Empty => self.consumer.try_peek().err().unwrap_or(TryError::Empty),
            e => e,
        };
        self.error(e)
    }

    /// Receives the next message into `buf`, waiting up to `timeout` (spin,
    /// yield, then sleep). Fails with [`Error::Timeout`] when the time is up,
    /// [`Error::PeerDead`] or [`Error::PeerGone`] when the ring is empty and
    /// the sender stopped, [`Error::Broken`] on corrupt data.
    pub fn recv(&mut self, buf: &mut Vec<u8>, timeout: Duration) -> Result<usize, Error> {
        let f = self.wait(timeout)?;
        Ok(self.take(f, buf))
    }

    /// Waits for the next frame. The first polls are inline, with nothing
    /// but `poll` and a pause between them: no clock (~25 ns, a good part
    /// of a hop), no look at the producer's flag. Those come in
    /// [`Receiver::wait_long`], after [`SPIN_INLINE`] polls.
    #[inline(always)]
    fn wait(&mut self, timeout: Duration) -> Result<Frame, Error> {
        for _ in 0..SPIN_INLINE {
            match self.consumer.poll() {
                Ok(f) => return Ok(f),
                Err(TryError::Empty) => spin_loop(),
                Err(e) => return Err(self.error(e)),
            }
        }
        self.wait_long(timeout)
    }

    /// [`Receiver::wait`] past its inline polls: spin, yield, then sleep on
    /// the doorbell (or with timed back-off without one), watching the
    /// producer's flag, the peer's liveness and the deadline whenever the
    /// waiter reads the clock or the doorbell wakes it.
    #[inline(never)]
    fn wait_long(&mut self, timeout: Duration) -> Result<Frame, Error> {
        let mut waiter = Waiter::after_idle(self.idle).spinning_for(self.spin);
        let r = self.wait_with(&mut waiter, timeout);
        self.idle = match r {
            // Only a wait that ran out adds to the idle time.
            Err(Error::Timeout { waited, .. }) => self.idle + waited,
            _ => Duration::ZERO,
        };
        r
    }

    fn wait_with(&mut self, waiter: &mut Waiter, timeout: Duration) -> Result<Frame, Error> {
        loop {
            let looked = if self.dozes && waiter.sleeping() {
                if let Some(f) = self.doze(waiter, timeout)? {
                    return Ok(f);
                }
                Some(Instant::now())
            } else {
                waiter.pause()
            };
            if let Some(now) = looked {
                match self.consumer.try_peek() {
                    Ok(f) => return Ok(f),
                    Err(TryError::Empty) => {}
                    Err(e) => return Err(self.error(e)),
                }
                let ring = (self.from(), self.to());
                let progress = self.progress();
                if let Err(e) = look_up(
                    &self.hold.endpoint,
                    &mut self.watch,
                    (self.peer, progress),
                    now,
                    timeout,
                    waiter,
                    ring,
                ) {
                    // A last message may have been published just before the
                    // sender left: deliver it first.
                    return self.consumer.try_peek().map_err(|_| e);
                }
                continue;
            }
            match self.consumer.poll() {
                Ok(f) => return Ok(f),
                Err(TryError::Empty) => {}
                Err(e) => return Err(self.error(e)),
            }
        }
    }

    /// Sleeps on the doorbell (`ring.rs`, "The doorbell"): announces the
    /// sleep, looks at the ring once more, then waits until the sender rings,
    /// the deadline, or the next look at the peer's liveness is due. A frame
    /// found by the second look is returned; after a wake-up the caller
    /// looks again.
    #[cold]
    fn doze(&mut self, waiter: &Waiter, timeout: Duration) -> Result<Option<Frame>, Error> {
        match self.consumer.prepare_sleep() {
            Ok(f) => return Ok(Some(f)),
            Err(TryError::Empty) => {}
            Err(e) => return Err(self.error(e)),
        }
        let look = Instant::now() + self.look_every;
        let deadline = waiter
            .start()
            .checked_add(timeout)
            .map_or(look, |end| end.min(look));
        let mem = self.consumer.mem();
        let slept = match &mem.doorbell {
            Some(d) => d.wait(&mem.bell, deadline),
            None => Err(std::io::ErrorKind::Unsupported.into()),
        };
        self.consumer.awake();
        if slept.is_err() {
            // This doorbell cannot wait here: back-off sleeps from now on,
            // and no more announcements for senders to ring in vain.
            self.dozes = false;
        }
        Ok(None)
    }

    /// Whether this receiver sleeps on its doorbell when idle (false without
    /// one, or once its wait failed: then it polls with timed back-off).
    pub fn dozes(&self) -> bool {
        self.dozes
    }

    fn slot(&mut self, f: Frame) -> Result<RecvSlot<'_>, Error> {
        match self
            .consumer
            .mem()
            .area
            .lease(f.offset as usize, f.len as usize)
        {
            Some(lease) => Ok(RecvSlot {
                receiver: self,
                frame: f,
                lease,
            }),
            // Unreachable: validated frames never run past the data area.
            None => Err(Error::OutOfBounds {
                offset: f.offset,
                len: u64::from(f.len),
                size: self.consumer.mem().capacity(),
            }),
        }
    }

    /// The next message in place (zero copy), without consuming it: it stays
    /// in the ring until [`RecvSlot::release`].
    pub fn try_peek(&mut self) -> Result<RecvSlot<'_>, Error> {
        let f = self.consumer.try_peek().map_err(|e| self.error(e))?;
        self.slot(f)
    }

    /// [`Receiver::try_peek`], waiting up to `timeout` for a message.
    pub fn peek(&mut self, timeout: Duration) -> Result<RecvSlot<'_>, Error> {
        let f = self.wait(timeout)?;
        self.slot(f)
    }

    /// The sending peer's state, as this receiver has watched it (its
    /// heartbeat, or new messages, count as signs of life).
    pub fn peer_status(&mut self) -> PeerStatus {
        let words = self.hold.endpoint.entry_words(self.peer);
        let liveness = self.hold.endpoint.liveness;
        let progress = self.progress();
        self.watch
            .observe(self.peer, words, progress, Instant::now(), &liveness)
    }

    /// How far this receiver has read: moves while the sender sends.
    fn progress(&self) -> u64 {
        self.consumer.seen_tail()
    }
}

/// One received message, in place. `Deref<[u8]>`. The bytes live in shared
/// memory: a misbehaving peer could change them while you look, so copy
/// before validating anything that must not change under you.
#[derive(Debug)]
pub struct RecvSlot<'a> {
    receiver: &'a mut Receiver,
    frame: Frame,
    lease: Lease,
}

impl RecvSlot<'_> {
    /// Consumes the message and gives its room back to the sender.
    pub fn release(self) {
        let RecvSlot {
            receiver, frame, ..
        } = self;
        receiver.consumer.release(frame);
    }
}

impl Deref for RecvSlot<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.receiver.consumer.mem().area.bytes(&self.lease)
    }
}
