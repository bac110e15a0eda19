//! The frame format and the index protocol of one single-producer
//! single-consumer ring, written against [`RingMem`] so that the same code runs
//! on a window (`raw::RingArea`) and on loom's model of memory (`loom_model.rs`).
//!
//! Positions are ever-increasing `u64` byte counts (wrapping after 2^64 bytes);
//! the offset in the data area is `position mod capacity`. The producer owns
//! the write position (everything before it is written), the consumer owns
//! `tail` (everything before it is consumed) and publishes it in the window;
//! the filled part never exceeds the capacity. The producer caches the tail
//! and reloads it only when its cached value says "full".
//!
//! A frame is an 8-byte header and the payload padded to 8 bytes. The header is
//! `len: u32 | kind: u16 << 32 | check: u16 << 48`, where `check` hashes the
//! length, the kind and the frame's *position*, so garbage and stale frames of
//! an earlier lap are caught. A frame never wraps: when it does not fit before
//! the end of the data area, a padding record covers the rest and the frame
//! starts at offset 0.
//!
//! **The header is the signal.** The consumer learns that a frame is ready by
//! reading the header word at its own read position (Acquire); the producer
//! writes the payload first and the header last (Release). There is no write
//! index on another cache line to poll, so a message costs the cache lines of
//! its frame and nothing else. For that to work the word at the producer's
//! write position must never look like a frame before the producer puts one
//! there. The producer therefore writes a zero *marker* at the end of each
//! frame before it publishes the frame, so the word the consumer reads next
//! is the marker, the next header, or (only when the frame fills the ring to
//! exactly one capacity past the consumer's position, where the marker would
//! land on an unconsumed header) the header of the previous lap at that
//! offset, which the consumer also reads as "nothing yet". The marker needs
//! no room of its own: positions are 8-aligned, so a frame that does not fill
//! the ring exactly leaves at least 8 free bytes after it.
//!
//! Batching: the header of the first frame after the last publish is held
//! back in the producer (the word in the window stays the marker), later
//! frames get their headers at once; publishing stores the held header with
//! Release, which makes the whole burst visible with one store.
//!
//! **The doorbell.** A consumer that found nothing for a while sleeps
//! instead of polling, and the producer wakes it, but only then: busy
//! traffic pays one fence and one load that hits in the producer's cache,
//! never a system call. The consumer's *doorbell word* (its own cache line)
//! says whether it is asleep. Going to sleep, the consumer stores `ASLEEP`
//! there, fences, and looks at the ring once more; only if that finds
//! nothing does it sleep. After every publish the producer fences and loads
//! the word; if it reads `ASLEEP`, it swaps it back to `AWAKE` (so a burst
//! rings once) and rings the doorbell. This is Dekker's pattern: of the
//! consumer's store-fence-load and the producer's store-fence-load, the
//! SeqCst fences are ordered one way or the other, and whichever comes
//! second sees the other's store. Either the producer sees `ASLEEP` and
//! rings, or the consumer's second look sees the frame. No lost wake-up;
//! the loom model checks it and fails when the second look is left out.
//! How a ring reaches the sleeper (a futex, a message through a relay) is
//! the [`crate::Doorbell`]'s business; its wait returns as soon as the word
//! no longer reads `ASLEEP`, so a ring that comes before the sleep is not
//! lost either.
//!
//! The consumer trusts nothing it reads: a header must be zero, decode for its
//! position, or decode for the position one lap back; a frame must end before
//! the end of the data area; padding must cover exactly the rest of the area
//! and cannot start at offset 0. The producer checks the tail: 8-aligned, not
//! moving back, not past what was published. The first violation breaks the
//! ring for good.

use std::sync::atomic::Ordering;

use crate::error::Corruption;
use crate::layout::FRAME_HEADER;

pub(crate) const KIND_DATA: u16 = 0xD47A;
pub(crate) const KIND_PAD: u16 = 0x9AD0;

/// Doorbell word: the consumer is awake (polling, or not waiting at all).
pub(crate) const BELL_AWAKE: u64 = 0;
/// Doorbell word: the consumer sleeps (or is about to) until it is rung.
pub(crate) const BELL_ASLEEP: u64 = 1;

/// The memory one ring lives in.
pub(crate) trait RingMem {
    /// Size of the data area: a power of two, at least 16.
    fn capacity(&self) -> u64;
    fn load_tail(&self, order: Ordering) -> u64;
    fn store_tail(&self, value: u64, order: Ordering);
    /// The 8-byte word at data offset `pos mod capacity` (8-aligned): a frame
    /// header or a marker.
    fn load_word(&self, pos: u64, order: Ordering) -> u64;
    fn store_word(&self, pos: u64, value: u64, order: Ordering);
    /// Copies `src` to data offset `off` (the range never wraps).
    fn write_payload(&self, off: u64, src: &[u8]);
    /// Appends `len` bytes from data offset `off` to `dst` (never wraps).
    fn read_payload(&self, off: u64, len: usize, dst: &mut Vec<u8>);
    /// A hint that the bytes at `pos mod capacity` are about to be read.
    fn prefetch(&self, _pos: u64) {}
    /// Whether the other side flagged the ring as corrupt.
    fn peer_flagged(&self) -> bool {
        false
    }
    /// Tells the other side that this side found the ring corrupt.
    fn flag_broken(&self) {}
    /// The consumer's doorbell word ([`BELL_AWAKE`] or [`BELL_ASLEEP`]; any
    /// other value, written by a misbehaving peer, reads as awake).
    fn load_bell(&self, order: Ordering) -> u64;
    fn store_bell(&self, value: u64, order: Ordering);
    /// Compare-and-swap of the doorbell word; true if it held `current`.
    fn swap_bell(&self, current: u64, new: u64) -> bool;
    /// A sequentially consistent fence (loom's own in the model).
    fn fence(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
    }
    /// Wakes the consumer, whose announcement of sleep the producer has
    /// just taken back.
    fn ring_bell(&self) {}
}

/// Why a non-blocking ring operation did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TryError {
    Full,
    Empty,
    TooLarge { len: usize, max: usize },
    Broken(Corruption),
}

fn check(pos: u64, len: u32, kind: u16) -> u16 {
    let x = pos ^ (u64::from(len) << 16) ^ (u64::from(kind) << 48) ^ 0x6d6b_6374_6c72_6e67;
    // The top 16 bits of a multiplicative hash depend on every input bit.
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as u16
}

/// The header word of a frame at `pos`; never zero (the kinds are not).
pub(crate) fn encode(pos: u64, len: u32, kind: u16) -> u64 {
    u64::from(len) | u64::from(kind) << 32 | u64::from(check(pos, len, kind)) << 48
}

/// A decoded frame header: its kind and payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Header {
    Data(u32),
    Pad(u32),
}

/// Decodes the header word found at position `pos`.
pub(crate) fn decode(word: u64, pos: u64) -> Result<Header, Corruption> {
    // Truncations pick the fields out of the word.
    #[allow(clippy::cast_possible_truncation)]
    let (len, kind, chk) = (word as u32, (word >> 32) as u16, (word >> 48) as u16);
    if chk == check(pos, len, kind) {
        match kind {
            KIND_DATA => return Ok(Header::Data(len)),
            KIND_PAD => return Ok(Header::Pad(len)),
            _ => {}
        }
    }
    Err(Corruption::FrameHeader { pos, word })
}

/// Bytes a frame with a `len`-byte payload takes: header plus padded payload.
pub(crate) fn frame_size(len: u64) -> u64 {
    FRAME_HEADER + ((len + 7) & !7)
}

/// Room reserved for one frame, not yet visible to the consumer.
#[derive(Debug)]
pub(crate) struct Reservation {
    pos: u64,
    len: u32,
}

impl Reservation {
    /// Data-area offset of the payload.
    pub(crate) fn payload_offset(&self, capacity: u64) -> u64 {
        (self.pos & (capacity - 1)) + FRAME_HEADER
    }

    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }
}

/// The producing side of a ring.
#[derive(Debug)]
pub(crate) struct Producer<M> {
    mem: M,
    cap: u64,
    /// Everything before `head` is written (published or not).
    head: u64,
    /// Frames before `published` are visible to the consumer.
    published: u64,
    /// The header of the frame at `published`, held back until the next
    /// publish while frames are batched (`published != head`).
    held: u64,
    /// The last validated read position: room up to `tail + cap` is free.
    tail: u64,
    broken: Option<Corruption>,
}

impl<M: RingMem> Producer<M> {
    /// Resumes after the frames in the window: 0 after formatting; after a
    /// restart, the end of the frames the previous incarnation published,
    /// found by walking the headers from the consumer's read position to the
    /// marker (or the end of the ring).
    pub(crate) fn new(mem: M) -> Self {
        let cap = mem.capacity();
        ////////////////
        // SYNC POINT: consumer finished reading up to tail (see `release`)
        ////////////////
        let tail = mem.load_tail(Ordering::Acquire);
        let mut p = Producer {
            mem,
            cap,
            head: tail,
            published: tail,
            held: 0,
            tail,
            broken: None,
        };
        if tail % 8 != 0 {
            p.fail(Corruption::TailOutOfRange {
                tail,
                lowest: tail & !7,
                highest: tail & !7,
            });
            return p;
        }
        // Terminates: every pass moves `head` forward by at least 8 bytes,
        // and at most one capacity past `tail`.
        while p.head.wrapping_sub(tail) < cap {
            let pos = p.head;
            ////////////////
            // SYNC POINT: frame written (see `publish`)
            ////////////////
            let word = p.mem.load_word(pos, Ordering::Acquire);
            let room = cap - (pos & (cap - 1));
            let size = match decode(word, pos) {
                Ok(Header::Data(len)) => frame_size(u64::from(len)),
                Ok(Header::Pad(len)) if u64::from(len) + FRAME_HEADER == room && room != cap => {
                    room
                }
                _ => break,
            };
            if size > room || pos.wrapping_add(size).wrapping_sub(tail) > cap {
                break;
            }
            p.head = pos.wrapping_add(size);
        }
        p.published = p.head;
        if p.mem.peer_flagged() {
            p.fail(Corruption::PeerFlagged);
        }
        p
    }

    pub(crate) fn mem(&self) -> &M {
        &self.mem
    }

    pub(crate) fn broken(&self) -> Option<Corruption> {
        self.broken
    }

    /// The consumer's position as last seen.
    pub(crate) fn seen_tail(&self) -> u64 {
        self.tail
    }

    /// The end of the committed frames.
    pub(crate) fn position(&self) -> u64 {
        self.head
    }

    /// Largest payload: a frame may fill the whole data area.
    pub(crate) fn max_payload(&self) -> u64 {
        self.cap - FRAME_HEADER
    }

    /// Frames written but not yet published.
    pub(crate) fn has_unpublished(&self) -> bool {
        self.published != self.head
    }

    fn fail(&mut self, c: Corruption) -> TryError {
        if self.broken.is_none() {
            self.broken = Some(c);
            self.mem.flag_broken();
        }
        TryError::Broken(self.broken.unwrap_or(c))
    }

    /// Reloads the consumer's position; it may only move forward, up to what
    /// was published.
    fn refresh_tail(&mut self) -> Result<(), TryError> {
        ////////////////
        // SYNC POINT: consumer finished reading up to tail (see `release`)
        ////////////////
        let t = self.mem.load_tail(Ordering::Acquire);
        if t % 8 != 0 || t.wrapping_sub(self.tail) > self.published.wrapping_sub(self.tail) {
            return Err(self.fail(Corruption::TailOutOfRange {
                tail: t,
                lowest: self.tail,
                highest: self.published,
            }));
        }
        self.tail = t;
        if self.mem.peer_flagged() {
            return Err(self.fail(Corruption::PeerFlagged));
        }
        Ok(())
    }

    /// Makes sure `need` more bytes fit after `head`. (The marker after a
    /// frame needs no room of its own: positions are 8-aligned, so a frame
    /// either fills the ring exactly, and has no marker, or leaves 8 bytes.)
    fn ensure(&mut self, need: u64) -> Result<(), TryError> {
        if self.head.wrapping_sub(self.tail) + need <= self.cap {
            return Ok(());
        }
        self.refresh_tail()?;
        if self.head.wrapping_sub(self.tail) + need <= self.cap {
            return Ok(());
        }
        // Let the consumer see what was batched, or it may never make room.
        self.publish();
        Err(TryError::Full)
    }

    /// Finishes the frame at `head` whose header is `word` and which ends at
    /// `end`: the marker goes after it, then the header (held back if it is
    /// the first frame since the last publish).
    #[inline(always)]
    fn seal(&mut self, word: u64, end: u64) {
        self.mark_end(end);
        if self.published == self.head {
            self.held = word;
        } else {
            // Ordered by the Release store of the held header.
            self.mem.store_word(self.head, word, Ordering::Relaxed);
        }
        self.head = end;
    }

    /// Writes the marker after a frame ending at `end`. Where a frame fills
    /// the ring exactly, the word at its end is the header at `tail`
    /// (unconsumed, or consumed and reading as the previous lap's): no
    /// marker, see the module doc.
    #[inline(always)]
    fn mark_end(&self, end: u64) {
        if end.wrapping_sub(self.tail) != self.cap {
            self.mem.store_word(end, 0, Ordering::Relaxed);
        }
    }

    /// Reserves a frame for `len` payload bytes at the head, first padding to
    /// the end of the data area if the frame would wrap.
    pub(crate) fn try_reserve(&mut self, len: usize) -> Result<Reservation, TryError> {
        if let Some(c) = self.broken {
            return Err(TryError::Broken(c));
        }
        let max = self.max_payload();
        let len32 = match u32::try_from(len) {
            Ok(l) if u64::from(l) <= max => l,
            _ => {
                return Err(TryError::TooLarge {
                    len,
                    max: usize::try_from(max).unwrap_or(usize::MAX),
                })
            }
        };
        let frame = frame_size(u64::from(len32));
        let room_to_end = self.cap - (self.head & (self.cap - 1));
        if frame > room_to_end {
            // The padding goes in as soon as it fits, even if the frame does
            // not yet: once the consumer passes it, the whole area is contiguous.
            self.ensure(room_to_end)?;
            // room_to_end >= 8 because positions are 8-aligned, and < cap
            // because a frame always fits at offset 0; the length field holds
            // what follows the padding's own header.
            let pad_len = (room_to_end - FRAME_HEADER) as u32;
            let word = encode(self.head, pad_len, KIND_PAD);
            self.seal(word, self.head.wrapping_add(room_to_end));
        }
        self.ensure(frame)?;
        Ok(Reservation {
            pos: self.head,
            len: len32,
        })
    }

    /// Sends `payload` as one frame: reserve, fill and commit in one pass, and
    /// publish unless batching. The common case (ring healthy, the frame fits
    /// before the end of the area and in the room already known) takes a few
    /// comparisons; anything else goes through [`Producer::try_reserve`].
    #[inline(always)]
    pub(crate) fn send(&mut self, payload: &[u8], publish: bool) -> Result<(), TryError> {
        let len = payload.len() as u64;
        let off = self.head & (self.cap - 1);
        // `len <= cap - 8` first, so `frame_size` cannot overflow and the
        // length fits the header's 32 bits (cap <= 2^31).
        let fast = self.broken.is_none()
            && len <= self.cap - FRAME_HEADER
            && off + frame_size(len) <= self.cap
            && self.head.wrapping_sub(self.tail) + frame_size(len) <= self.cap;
        if !fast {
            return self.send_slow(payload, publish);
        }
        #[allow(clippy::cast_possible_truncation)]
        let r = Reservation {
            pos: self.head,
            len: len as u32,
        };
        self.fill(&r, payload);
        self.commit_with(r, publish);
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn send_slow(&mut self, payload: &[u8], publish: bool) -> Result<(), TryError> {
        let r = self.try_reserve(payload.len())?;
        self.fill(&r, payload);
        self.commit_with(r, publish);
        Ok(())
    }

    /// Copies `payload` into a reservation.
    #[inline(always)]
    pub(crate) fn fill(&self, r: &Reservation, payload: &[u8]) {
        debug_assert_eq!(payload.len(), r.len());
        self.mem.write_payload(r.payload_offset(self.cap), payload);
    }

    /// Writes the frame's marker and header and moves the local head past it;
    /// the frame is visible to the consumer after the next
    /// [`Producer::publish`].
    #[inline(always)]
    pub(crate) fn commit(&mut self, r: Reservation) {
        self.commit_with(r, false);
    }

    /// [`Producer::commit`], then with `publish` [`Producer::publish`]. When
    /// nothing is batched the header goes straight in with Release instead
    /// of through the held word: the same stores, fewer steps on the hot
    /// path.
    #[inline(always)]
    pub(crate) fn commit_with(&mut self, r: Reservation, publish: bool) {
        debug_assert_eq!(r.pos, self.head, "reservations are committed in order");
        let end = r.pos.wrapping_add(frame_size(u64::from(r.len)));
        let word = encode(r.pos, r.len, KIND_DATA);
        if publish && self.published == self.head {
            self.mark_end(end);
            ////////////////
            // SYNC POINT: frame written (see `poll`)
            ////////////////
            self.mem.store_word(self.head, word, Ordering::Release);
            self.head = end;
            self.published = end;
            self.wake_consumer();
        } else {
            self.seal(word, end);
            if publish {
                self.publish();
            }
        }
    }

    /// Makes every committed frame visible with one store.
    #[inline(always)]
    pub(crate) fn publish(&mut self) {
        if self.published != self.head {
            ////////////////
            // SYNC POINT: frame written (see `poll`): the payloads, the
            // markers and the later headers of the burst before its first
            // header
            ////////////////
            self.mem
                .store_word(self.published, self.held, Ordering::Release);
            self.published = self.head;
            self.wake_consumer();
        }
    }

    /// After a publish: rings the consumer's doorbell if it announced that
    /// it sleeps (module doc). One fence and a load of a line the consumer
    /// rarely writes: no system call while traffic flows.
    #[inline(always)]
    fn wake_consumer(&self) {
        ////////////////
        // SYNC POINT: doorbell (see `Consumer::announce_sleep`): the header
        // stored above, then this fence, then the load of the doorbell word
        ////////////////
        self.mem.fence();
        if self.mem.load_bell(Ordering::Relaxed) == BELL_ASLEEP {
            self.ring();
        }
    }

    /// Takes the consumer's announcement back and rings, once per sleep:
    /// the frames of a burst that follow find the word awake.
    #[cold]
    #[inline(never)]
    fn ring(&self) {
        if self.mem.swap_bell(BELL_ASLEEP, BELL_AWAKE) {
            self.mem.ring_bell();
        }
    }
}

/// A frame found by the consumer, not yet released.
#[derive(Debug)]
pub(crate) struct Frame {
    /// Data-area offset of the payload.
    pub(crate) offset: u64,
    pub(crate) len: u32,
    /// Position just after the frame.
    end: u64,
}

/// The consuming side of a ring.
#[derive(Debug)]
pub(crate) struct Consumer<M> {
    mem: M,
    cap: u64,
    /// Position of the next frame header (padding already skipped).
    tail: u64,
    broken: Option<Corruption>,
}

impl<M: RingMem> Consumer<M> {
    /// Resumes from the read position in the window.
    pub(crate) fn new(mem: M) -> Self {
        let cap = mem.capacity();
        // Only this side writes tail; after a restart the old value is ours.
        let tail = mem.load_tail(Ordering::Relaxed);
        let mut c = Consumer {
            mem,
            cap,
            tail,
            broken: None,
        };
        if tail % 8 != 0 {
            c.fail(Corruption::TailOutOfRange {
                tail,
                lowest: tail & !7,
                highest: tail & !7,
            });
        } else if c.mem.peer_flagged() {
            c.fail(Corruption::PeerFlagged);
        }
        c
    }

    pub(crate) fn mem(&self) -> &M {
        &self.mem
    }

    pub(crate) fn broken(&self) -> Option<Corruption> {
        self.broken
    }

    /// How far this side has read: moves while the producer sends.
    pub(crate) fn seen_tail(&self) -> u64 {
        self.tail
    }

    fn fail(&mut self, c: Corruption) -> TryError {
        if self.broken.is_none() {
            self.broken = Some(c);
            self.mem.flag_broken();
        }
        TryError::Broken(self.broken.unwrap_or(c))
    }

    /// Nothing at `pos` yet; or the producer gave up on the ring.
    fn empty(&mut self) -> TryError {
        if self.mem.peer_flagged() {
            return self.fail(Corruption::PeerFlagged);
        }
        TryError::Empty
    }

    /// The next frame, validated, without consuming it. `Empty` also checks
    /// whether the producer flagged the ring.
    pub(crate) fn try_peek(&mut self) -> Result<Frame, TryError> {
        match self.poll() {
            Err(TryError::Empty) => Err(self.empty()),
            other => other,
        }
    }

    /// [`Consumer::try_peek`] without the look at the producer's flag when
    /// the ring is empty: the spin of a blocking receive, which looks at the
    /// flag every so often instead. The common case (a data frame for this
    /// position that fits) is one load, the header check and one comparison.
    #[inline(always)]
    pub(crate) fn poll(&mut self) -> Result<Frame, TryError> {
        let pos = self.tail;
        ////////////////
        // SYNC POINT: frame written (see `publish`)
        ////////////////
        let word = self.mem.load_word(pos, Ordering::Acquire);
        if word == 0 && self.broken.is_none() {
            return Err(TryError::Empty);
        }
        // The frame's next cache line, fetched while the header is checked.
        // Without the hint the payload loads, whose addresses depend on the
        // length in the header, go out only after it is decoded; between two
        // cores that cost ~25 ns of a 64-byte message's ~100 ns (README).
        self.mem.prefetch(pos.wrapping_add(64));
        let offset = pos & (self.cap - 1);
        if let (None, Ok(Header::Data(len))) = (self.broken, decode(word, pos)) {
            let size = frame_size(u64::from(len));
            if size <= self.cap - offset {
                return Ok(Frame {
                    offset: offset + FRAME_HEADER,
                    len,
                    end: pos.wrapping_add(size),
                });
            }
        }
        self.poll_slow(word)
    }

    /// Everything [`Consumer::poll`]'s common case leaves: a broken ring,
    /// padding, the header a lap back, corruption. `word` is what `poll` read
    /// at the read position.
    #[cold]
    #[inline(never)]
    fn poll_slow(&mut self, mut word: u64) -> Result<Frame, TryError> {
        if let Some(c) = self.broken {
            return Err(TryError::Broken(c));
        }
        // At most two passes: padding is never at offset 0, where the pass
        // after padding looks.
        loop {
            let pos = self.tail;
            if word == 0 {
                return Err(TryError::Empty);
            }
            let offset = pos & (self.cap - 1);
            let room = self.cap - offset;
            let header = match decode(word, pos) {
                Ok(h) => h,
                // The header one lap back, left where a frame filled the
                // ring exactly: nothing new yet.
                Err(_) if decode(word, pos.wrapping_sub(self.cap)).is_ok() => {
                    return Err(TryError::Empty)
                }
                Err(c) => return Err(self.fail(c)),
            };
            match header {
                Header::Pad(len) => {
                    let expected = room - FRAME_HEADER;
                    if u64::from(len) != expected || offset == 0 {
                        return Err(self.fail(Corruption::Padding { pos, len, expected }));
                    }
                    self.tail = pos.wrapping_add(room);
                    ////////////////
                    // SYNC POINT: consumer finished reading up to tail (see
                    // `refresh_tail`): the producer may be waiting for the
                    // padding to go before it can place a frame at offset 0.
                    ////////////////
                    self.mem.store_tail(self.tail, Ordering::Release);
                    ////////////////
                    // SYNC POINT: frame written (see `publish`)
                    ////////////////
                    word = self.mem.load_word(self.tail, Ordering::Acquire);
                }
                Header::Data(len) => {
                    let size = frame_size(u64::from(len));
                    if size > room {
                        return Err(self.fail(Corruption::FrameLength {
                            len,
                            offset,
                            capacity: self.cap,
                        }));
                    }
                    return Ok(Frame {
                        offset: offset + FRAME_HEADER,
                        len,
                        end: pos.wrapping_add(size),
                    });
                }
            }
        }
    }

    /// Announces that the consumer is going to sleep: stores `ASLEEP` in its
    /// doorbell word, then fences. The caller must look at the ring again
    /// before it sleeps ([`Consumer::prepare_sleep`] does both).
    pub(crate) fn announce_sleep(&self) {
        self.mem.store_bell(BELL_ASLEEP, Ordering::Relaxed);
        ////////////////
        // SYNC POINT: doorbell (see `Producer::wake_consumer`): the doorbell
        // word stored above, then this fence, then the caller's second look
        // at the header
        ////////////////
        self.mem.fence();
    }

    /// Gets ready to sleep: announces it, then looks at the ring once more.
    /// `Err(Empty)`: nothing came, and the caller may sleep on its doorbell
    /// until rung (and must call [`Consumer::awake`] when it wakes). Anything
    /// else (a frame, a broken ring) withdraws the announcement.
    pub(crate) fn prepare_sleep(&mut self) -> Result<Frame, TryError> {
        self.announce_sleep();
        match self.try_peek() {
            Err(TryError::Empty) => Err(TryError::Empty),
            other => {
                self.awake();
                other
            }
        }
    }

    /// The consumer is awake again (woken, timed out, or never slept): the
    /// producer need not ring.
    pub(crate) fn awake(&self) {
        self.mem.store_bell(BELL_AWAKE, Ordering::Relaxed);
    }

    /// Appends a peeked frame's payload to `dst`.
    #[inline(always)]
    pub(crate) fn read(&self, f: &Frame, dst: &mut Vec<u8>) {
        self.mem.read_payload(f.offset, f.len as usize, dst);
    }

    /// Consumes a peeked frame and gives its room back to the producer.
    #[inline(always)]
    pub(crate) fn release(&mut self, f: Frame) {
        self.tail = f.end;
        ////////////////
        // SYNC POINT: consumer finished reading up to tail (see `refresh_tail`)
        ////////////////
        self.mem.store_tail(self.tail, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::HeapRing;

    fn send(p: &mut Producer<&HeapRing>, msg: &[u8]) -> Result<(), TryError> {
        send_batched(p, msg)?;
        p.publish();
        Ok(())
    }

    fn send_batched(p: &mut Producer<&HeapRing>, msg: &[u8]) -> Result<(), TryError> {
        let r = p.try_reserve(msg.len())?;
        p.fill(&r, msg);
        p.commit(r);
        Ok(())
    }

    fn recv(c: &mut Consumer<&HeapRing>) -> Result<Vec<u8>, TryError> {
        let f = c.try_peek()?;
        let mut v = Vec::new();
        c.read(&f, &mut v);
        c.release(f);
        Ok(v)
    }

    fn broken<T: std::fmt::Debug>(r: Result<T, TryError>) -> Corruption {
        match r {
            Err(TryError::Broken(c)) => c,
            other => panic!("expected a broken ring, got {other:?}"),
        }
    }

    fn word(ring: &HeapRing, pos: u64) -> u64 {
        (&ring).load_word(pos, Ordering::Relaxed)
    }

    fn poke(ring: &HeapRing, pos: u64, value: u64) {
        (&ring).store_word(pos, value, Ordering::Relaxed);
    }

    #[test]
    fn the_word_after_the_last_frame_reads_as_nothing_yet() {
        let ring = HeapRing::new(64);
        let mut p = Producer::new(&ring);
        let mut c = Consumer::new(&ring);
        poke(&ring, 16, 0x5555_5555_5555_5555);
        send(&mut p, &[1; 8]).unwrap();
        assert_eq!(word(&ring, 16), 0, "no marker after the frame");
        assert_eq!(recv(&mut c).unwrap(), [1; 8]);
        assert_eq!(c.try_peek().err(), Some(TryError::Empty));
        // A frame filling the ring exactly leaves the header at the read
        // position (one lap back for the reader) instead of a marker.
        let mut p = Producer::new(&ring);
        send(&mut p, &[2; 40]).unwrap();
        assert_eq!(p.position(), 16 + 48);
        assert_eq!(recv(&mut c).unwrap(), [2; 40]);
        assert_eq!(word(&ring, 64), 0);
        // The largest message fills the ring: the word after it is its own
        // header, which names the position a lap back.
        send(&mut p, &[3; 56]).unwrap();
        assert_eq!(decode(word(&ring, 128), 64), Ok(Header::Data(56)));
        assert_eq!(recv(&mut c).unwrap(), [3; 56]);
        assert_eq!(c.try_peek().err(), Some(TryError::Empty));
        send(&mut p, &[4; 8]).unwrap();
        assert_eq!(recv(&mut c).unwrap(), [4; 8]);
    }

    #[test]
    fn batched_frames_appear_together_at_publish() {
        let ring = HeapRing::new(128);
        let mut p = Producer::new(&ring);
        let mut c = Consumer::new(&ring);
        for i in 0..3u8 {
            send_batched(&mut p, &[i; 8]).unwrap();
            assert_eq!(c.try_peek().err(), Some(TryError::Empty));
        }
        assert!(p.has_unpublished());
        // The first header is held back; the others are already in place.
        assert_eq!(word(&ring, 0), 0);
        assert_eq!(decode(word(&ring, 16), 16), Ok(Header::Data(8)));
        p.publish();
        for i in 0..3u8 {
            assert_eq!(recv(&mut c).unwrap(), [i; 8]);
        }
        assert_eq!(c.try_peek().err(), Some(TryError::Empty));
    }

    #[test]
    fn garbage_or_a_header_for_another_position_breaks_the_ring() {
        for bad in [
            0x5555_5555_5555_5555,
            encode(16 + 64 * 2, 8, KIND_DATA),
            encode(24, 8, KIND_DATA),
            encode(16, 8, 0x1234),
        ] {
            let ring = HeapRing::new(64);
            let mut p = Producer::new(&ring);
            let mut c = Consumer::new(&ring);
            send(&mut p, &[1; 8]).unwrap();
            assert_eq!(recv(&mut c).unwrap(), [1; 8]);
            poke(&ring, 16, bad);
            let cause = broken(c.try_peek());
            assert_eq!(cause, Corruption::FrameHeader { pos: 16, word: bad });
            // Sticky, even once the word looks fine again.
            poke(&ring, 16, 0);
            assert_eq!(broken(c.try_peek()), cause);
        }
    }

    #[test]
    fn tail_may_not_pass_what_was_published() {
        let ring = HeapRing::new(64);
        let mut p = Producer::new(&ring);
        send(&mut p, &[1; 8]).unwrap();
        send(&mut p, &[2; 8]).unwrap();
        send(&mut p, &[3; 8]).unwrap();
        send(&mut p, &[4; 8]).unwrap();
        // Full: the producer must reload the tail, which claims too much.
        (&ring).store_tail(72, Ordering::Relaxed);
        let cause = broken(p.try_reserve(8));
        assert_eq!(
            cause,
            Corruption::TailOutOfRange {
                tail: 72,
                lowest: 0,
                highest: 64
            }
        );
    }

    #[test]
    fn frames_must_fit_before_the_end() {
        let cap = 64;
        // Valid check, but the frame runs past the end of the data area.
        let ring = HeapRing::new(cap);
        poke(&ring, 48, encode(48, 9, KIND_DATA));
        (&ring).store_tail(48, Ordering::Relaxed);
        let mut c = Consumer::new(&ring);
        assert_eq!(
            broken(c.try_peek()),
            Corruption::FrameLength {
                len: 9,
                offset: 48,
                capacity: 64
            }
        );
        // A huge length.
        let ring = HeapRing::new(cap);
        poke(&ring, 0, encode(0, u32::MAX, KIND_DATA));
        let mut c = Consumer::new(&ring);
        assert!(matches!(
            broken(c.try_peek()),
            Corruption::FrameLength { len: u32::MAX, .. }
        ));
    }

    #[test]
    fn padding_must_cover_exactly_the_rest_of_the_area_and_not_start_it() {
        let ring = HeapRing::new(64);
        poke(&ring, 32, encode(32, 8, KIND_PAD));
        (&ring).store_tail(32, Ordering::Relaxed);
        let mut c = Consumer::new(&ring);
        assert_eq!(
            broken(c.try_peek()),
            Corruption::Padding {
                pos: 32,
                len: 8,
                expected: 24
            }
        );
        // Padding at offset 0 would be followed by padding again, forever.
        let ring = HeapRing::new(64);
        poke(&ring, 0, encode(0, 56, KIND_PAD));
        let mut c = Consumer::new(&ring);
        assert_eq!(
            broken(c.try_peek()),
            Corruption::Padding {
                pos: 0,
                len: 56,
                expected: 56
            }
        );
    }

    #[test]
    fn a_stale_frame_from_the_previous_lap_reads_as_nothing_yet() {
        let ring = HeapRing::new(64);
        let mut p = Producer::new(&ring);
        let mut c = Consumer::new(&ring);
        for i in 0..4u8 {
            send(&mut p, &[i; 8]).unwrap();
            recv(&mut c).unwrap();
        }
        // The fourth frame filled the ring exactly (as far as the producer
        // knew): no marker at 64, where the first frame's header still is.
        assert_eq!(decode(word(&ring, 64), 0), Ok(Header::Data(8)));
        assert_eq!(c.try_peek().err(), Some(TryError::Empty));
        // Two laps back is corruption, not "nothing yet".
        poke(&ring, 64, encode(64u64.wrapping_sub(128), 8, KIND_DATA));
        assert!(matches!(
            broken(c.try_peek()),
            Corruption::FrameHeader { pos: 64, .. }
        ));
    }

    #[test]
    fn a_restarted_producer_resumes_after_the_published_frames() {
        let ring = HeapRing::new(128);
        let mut c = Consumer::new(&ring);
        let mut p = Producer::new(&ring);
        for i in 0..5u8 {
            send(&mut p, &vec![i; usize::from(i) * 3]).unwrap();
        }
        assert_eq!(recv(&mut c).unwrap(), []);
        // Unpublished frames die with the producer.
        send_batched(&mut p, &[9; 8]).unwrap();
        let end = p.published;
        // The producer dies here (shadowed below).
        let mut p = Producer::new(&ring);
        assert_eq!(p.position(), end);
        send(&mut p, &[7; 20]).unwrap();
        for i in 1..5u8 {
            assert_eq!(recv(&mut c).unwrap(), vec![i; usize::from(i) * 3]);
        }
        assert_eq!(recv(&mut c).unwrap(), [7; 20]);
        assert_eq!(c.try_peek().err(), Some(TryError::Empty));
    }

    #[test]
    fn a_message_as_large_as_the_ring_always_gets_through() {
        let ring = HeapRing::new(64);
        let mut p = Producer::new(&ring);
        let mut c = Consumer::new(&ring);
        let big: Vec<u8> = (0..56).collect();
        for offset in [0usize, 8, 16, 40, 56] {
            if offset > 0 {
                // Move both positions so the big frame starts at `offset`.
                send(&mut p, &vec![0; offset - 8]).unwrap();
                recv(&mut c).unwrap();
            }
            loop {
                match send(&mut p, &big) {
                    Ok(()) => break,
                    Err(TryError::Full) => assert_eq!(c.try_peek().err(), Some(TryError::Empty)),
                    Err(e) => panic!("{e:?}"),
                }
            }
            assert_eq!(recv(&mut c).unwrap(), big);
        }
        assert_eq!(
            p.try_reserve(57).err(),
            Some(TryError::TooLarge { len: 57, max: 56 })
        );
    }

    fn rings(ring: &HeapRing) -> u64 {
        ring.rings.load(Ordering::Relaxed)
    }

    #[test]
    fn a_consumer_that_does_not_sleep_is_never_rung() {
        let ring = HeapRing::new(256);
        let mut p = Producer::new(&ring);
        let mut c = Consumer::new(&ring);
        for i in 0..1000u32 {
            send(&mut p, &i.to_le_bytes()).unwrap();
            assert_eq!(recv(&mut c).unwrap(), i.to_le_bytes());
        }
        assert_eq!(rings(&ring), 0, "busy traffic rang the doorbell");
    }

    #[test]
    fn a_sleeping_consumer_is_rung_once_per_sleep() {
        let ring = HeapRing::new(256);
        let mut p = Producer::new(&ring);
        let mut c = Consumer::new(&ring);
        assert_eq!(c.prepare_sleep().err(), Some(TryError::Empty));
        assert_eq!((&ring).load_bell(Ordering::Relaxed), BELL_ASLEEP);
        // A burst: the first publish takes the announcement back and rings,
        // the others find the consumer awake.
        for i in 0..3u8 {
            send(&mut p, &[i; 8]).unwrap();
        }
        assert_eq!(rings(&ring), 1);
        assert_eq!((&ring).load_bell(Ordering::Relaxed), BELL_AWAKE);
        c.awake();
        for i in 0..3u8 {
            assert_eq!(recv(&mut c).unwrap(), [i; 8]);
        }
        // Next sleep, next ring; batched frames ring at the publish only.
        assert_eq!(c.prepare_sleep().err(), Some(TryError::Empty));
        send_batched(&mut p, &[7; 8]).unwrap();
        send_batched(&mut p, &[8; 8]).unwrap();
        assert_eq!(rings(&ring), 1, "rang before the frames were visible");
        p.publish();
        assert_eq!(rings(&ring), 2);
    }

    #[test]
    fn the_second_look_finds_what_came_before_the_announcement() {
        let ring = HeapRing::new(256);
        let mut p = Producer::new(&ring);
        let mut c = Consumer::new(&ring);
        send(&mut p, &[5; 8]).unwrap();
        let f = c.prepare_sleep().expect("the frame already there");
        // Found something: the announcement is withdrawn, nobody rings.
        assert_eq!((&ring).load_bell(Ordering::Relaxed), BELL_AWAKE);
        let mut v = Vec::new();
        c.read(&f, &mut v);
        c.release(f);
        assert_eq!(v, [5; 8]);
        send(&mut p, &[6; 8]).unwrap();
        assert_eq!(rings(&ring), 0);
    }

    #[test]
    fn a_full_ring_publishes_and_rings_before_it_says_full() {
        let ring = HeapRing::new(64);
        let mut p = Producer::new(&ring);
        let mut c = Consumer::new(&ring);
        assert_eq!(c.prepare_sleep().err(), Some(TryError::Empty));
        for i in 0..4u8 {
            send_batched(&mut p, &[i; 8]).unwrap();
        }
        assert_eq!(rings(&ring), 0);
        // No room for a fifth: the batch goes out (and the sleeper is rung)
        // so the consumer can make room.
        assert_eq!(p.try_reserve(8).err(), Some(TryError::Full));
        assert_eq!(rings(&ring), 1);
        assert_eq!(recv(&mut c).unwrap(), [0; 8]);
    }

    #[test]
    fn fuzz_entry_survives_simple_inputs() {
        crate::fuzz::frame_decoder(&[]);
        crate::fuzz::frame_decoder(&[0xff; 400]);
        crate::fuzz::frame_decoder(&[1; 400]);
        crate::fuzz::frame_decoder(&[2; 333]);
        crate::fuzz::frame_decoder(&[3; 600]);
    }

    #[test]
    fn header_round_trips_and_depends_on_position() {
        for &(pos, len) in &[(0u64, 0u32), (8, 1), (4096, 4088), (1 << 40, 77)] {
            let w = encode(pos, len, KIND_DATA);
            assert_ne!(w, 0, "a header must differ from the marker");
            assert_eq!(decode(w, pos), Ok(Header::Data(len)));
            assert!(decode(w, pos + 4096).is_err(), "stale lap accepted");
            assert!(decode(w ^ 1, pos).is_err(), "flipped length accepted");
            assert_eq!(
                decode(encode(pos, len, KIND_PAD), pos),
                Ok(Header::Pad(len))
            );
        }
        assert!(decode(0, 0).is_err());
        assert!(decode(u64::MAX, 0).is_err());
    }

    #[test]
    fn frame_sizes_are_padded_to_8() {
        assert_eq!(frame_size(0), 8);
        assert_eq!(frame_size(1), 16);
        assert_eq!(frame_size(8), 16);
        assert_eq!(frame_size(9), 24);
    }
}
