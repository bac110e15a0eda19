//! The frame format and the index protocol of one single-producer
//! single-consumer ring, written against [`RingMem`] so that the same code runs
//! on a window (`raw::RingArea`) and on loom's model of memory (`loom_model.rs`).
//!
//! Positions are ever-increasing `u64` byte counts (wrapping after 2^64 bytes);
//! the offset in the data area is `position mod capacity`. The producer owns
//! `head` (everything before it is written), the consumer owns `tail`
//! (everything before it is consumed); `head - tail` is the filled part and
//! never exceeds the capacity. Each side caches the other's position and
//! reloads it only when its cached value says "full" or "empty", so a steady
//! stream costs one cache-line transfer per direction per batch.
//!
//! A frame is an 8-byte header and the payload padded to 8 bytes. The header is
//! `len: u32 | kind: u16 << 32 | check: u16 << 48`, where `check` hashes the
//! length, the kind and the frame's *position*, so garbage and stale frames of
//! an earlier lap are caught. A frame never wraps: when it does not fit before
//! the end of the data area, a padding record covers the rest and the frame
//! starts at offset 0.
//!
//! The consumer trusts nothing it reads: the head must be 8-aligned, not move
//! back and stay within `tail + capacity`; a header must decode, its frame must
//! end before the end of the data area and before the head. The producer
//! checks the tail the same way. The first violation breaks the ring for good.

use std::sync::atomic::Ordering;

use crate::error::Corruption;
use crate::layout::FRAME_HEADER;

pub(crate) const KIND_DATA: u16 = 0xD47A;
pub(crate) const KIND_PAD: u16 = 0x9AD0;

/// The memory one ring lives in.
pub(crate) trait RingMem {
    /// Size of the data area: a power of two, at least 16.
    fn capacity(&self) -> u64;
    fn load_head(&self, order: Ordering) -> u64;
    fn store_head(&self, value: u64, order: Ordering);
    fn load_tail(&self, order: Ordering) -> u64;
    fn store_tail(&self, value: u64, order: Ordering);
    /// The 8-byte word at data offset `pos mod capacity` (8-aligned).
    fn load_word(&self, pos: u64) -> u64;
    fn store_word(&self, pos: u64, value: u64);
    /// Copies `src` to data offset `off` (the range never wraps).
    fn write_payload(&self, off: u64, src: &[u8]);
    /// Appends `len` bytes from data offset `off` to `dst` (never wraps).
    fn read_payload(&self, off: u64, len: usize, dst: &mut Vec<u8>);
    /// Starts loading the cache line of data position `pos` (published
    /// data only) so that its transfer overlaps the one being waited for.
    fn touch(&self, _pos: u64) {}
    /// Whether the other side flagged the ring as corrupt.
    fn peer_flagged(&self) -> bool {
        false
    }
    /// Tells the other side that this side found the ring corrupt.
    fn flag_broken(&self) {}
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
    /// The last value stored to the window's head.
    published: u64,
    /// The last validated read position: room up to `tail + cap` is free.
    tail: u64,
    broken: Option<Corruption>,
}

impl<M: RingMem> Producer<M> {
    /// Resumes from the positions in the window (0 and 0 after formatting; the
    /// previous incarnation's values after a restart), checking them.
    pub(crate) fn new(mem: M) -> Self {
        let cap = mem.capacity();
        // Only this side writes head; after a restart the old value is ours.
        let head = mem.load_head(Ordering::Relaxed);
        ////////////////
        // SYNC POINT: consumer finished reading up to tail (see `release`)
        ////////////////
        let tail = mem.load_tail(Ordering::Acquire);
        let mut p = Producer {
            mem,
            cap,
            head,
            published: head,
            tail,
            broken: None,
        };
        let used = head.wrapping_sub(tail);
        if head % 8 != 0 || tail % 8 != 0 || used > cap {
            p.fail(Corruption::TailOutOfRange {
                tail,
                lowest: head.wrapping_sub(cap),
                highest: head,
            });
        } else if p.mem.peer_flagged() {
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

    /// Makes sure `need` more bytes fit after `head`.
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
            // room_to_end >= 8 because positions are 8-aligned; the length
            // field holds what follows the padding's own header.
            let pad_len = (room_to_end - FRAME_HEADER) as u32;
            self.mem
                .store_word(self.head, encode(self.head, pad_len, KIND_PAD));
            self.head = self.head.wrapping_add(room_to_end);
        }
        self.ensure(frame)?;
        Ok(Reservation {
            pos: self.head,
            len: len32,
        })
    }

    /// Copies `payload` into a reservation.
    pub(crate) fn fill(&self, r: &Reservation, payload: &[u8]) {
        debug_assert_eq!(payload.len(), r.len());
        self.mem.write_payload(r.payload_offset(self.cap), payload);
    }

    /// Writes the frame's header and moves the local head past it; the frame
    /// is visible to the consumer after the next [`Producer::publish`].
    pub(crate) fn commit(&mut self, r: Reservation) {
        debug_assert_eq!(r.pos, self.head, "reservations are committed in order");
        self.mem.store_word(r.pos, encode(r.pos, r.len, KIND_DATA));
        self.head = r.pos.wrapping_add(frame_size(u64::from(r.len)));
    }

    /// Makes every committed frame visible with one store.
    pub(crate) fn publish(&mut self) {
        if self.published != self.head {
            ////////////////
            // SYNC POINT: frames before head are written (see `refresh_head`)
            ////////////////
            self.mem.store_head(self.head, Ordering::Release);
            self.published = self.head;
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
    /// The last validated write position: frames before it are readable.
    head: u64,
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
            head: tail,
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

    /// The producer's position as last seen.
    pub(crate) fn seen_head(&self) -> u64 {
        self.head
    }

    fn fail(&mut self, c: Corruption) -> TryError {
        if self.broken.is_none() {
            self.broken = Some(c);
            self.mem.flag_broken();
        }
        TryError::Broken(self.broken.unwrap_or(c))
    }

    /// Reloads the producer's position; it may only move forward, and never
    /// more than one capacity past our read position.
    fn refresh_head(&mut self) -> Result<(), TryError> {
        ////////////////
        // SYNC POINT: frames before head are written (see `publish`)
        ////////////////
        let h = self.mem.load_head(Ordering::Acquire);
        let ahead = h.wrapping_sub(self.tail);
        if h % 8 != 0 || ahead > self.cap || ahead < self.head.wrapping_sub(self.tail) {
            return Err(self.fail(Corruption::HeadOutOfRange {
                head: h,
                lowest: self.head,
                highest: self.tail.wrapping_add(self.cap),
            }));
        }
        if ahead == 0 && self.mem.peer_flagged() {
            return Err(self.fail(Corruption::PeerFlagged));
        }
        self.head = h;
        Ok(())
    }

    /// The next frame, validated, without consuming it.
    pub(crate) fn try_peek(&mut self) -> Result<Frame, TryError> {
        if let Some(c) = self.broken {
            return Err(TryError::Broken(c));
        }
        // Terminates: every pass returns or moves `tail` forward by at least 8
        // bytes toward `head`, which is at most one capacity ahead.
        loop {
            if self.tail == self.head {
                self.refresh_head()?;
                if self.tail == self.head {
                    return Err(TryError::Empty);
                }
            }
            let pos = self.tail;
            let offset = pos & (self.cap - 1);
            let room = self.cap - offset;
            let avail = self.head.wrapping_sub(pos);
            // A frame that spans two cache lines would cost two transfers in
            // a row (header, then the rest); ask for the second one now when
            // it holds published data.
            let next_line = 64 - (offset & 63);
            if avail > next_line && room > next_line {
                self.mem.touch(pos.wrapping_add(next_line));
            }
            let header = decode(self.mem.load_word(pos), pos).map_err(|c| self.fail(c))?;
            match header {
                Header::Pad(len) => {
                    let expected = room - FRAME_HEADER;
                    if u64::from(len) != expected || room > avail {
                        return Err(self.fail(Corruption::Padding { pos, len, expected }));
                    }
                    self.tail = pos.wrapping_add(room);
                    ////////////////
                    // SYNC POINT: consumer finished reading up to tail (see
                    // `refresh_tail`): the producer may be waiting for the
                    // padding to go before it can place a frame at offset 0.
                    ////////////////
                    self.mem.store_tail(self.tail, Ordering::Release);
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
                    if size > avail {
                        return Err(self.fail(Corruption::FrameBeyondHead {
                            pos,
                            end: pos.wrapping_add(size),
                            head: self.head,
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

    /// Appends a peeked frame's payload to `dst`.
    pub(crate) fn read(&self, f: &Frame, dst: &mut Vec<u8>) {
        self.mem.read_payload(f.offset, f.len as usize, dst);
    }

    /// Consumes a peeked frame and gives its room back to the producer.
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
        let r = p.try_reserve(msg.len())?;
        p.fill(&r, msg);
        p.commit(r);
        p.publish();
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

    #[test]
    fn head_may_not_move_back_jump_past_a_capacity_or_be_misaligned() {
        for bad in [u64::MAX - 7, 64 + 8, 4, 1 << 40] {
            let ring = HeapRing::new(64);
            let mut p = Producer::new(&ring);
            let mut c = Consumer::new(&ring);
            send(&mut p, &[1; 8]).unwrap();
            assert_eq!(recv(&mut c).unwrap(), [1; 8]);
            // head = tail = 16 now; a valid head lies in 16..=80.
            (&ring).store_head(bad.wrapping_add(16), Ordering::Relaxed);
            let cause = broken(c.try_peek());
            assert!(
                matches!(cause, Corruption::HeadOutOfRange { .. }),
                "{cause}"
            );
            // Sticky, even once the head looks fine again.
            (&ring).store_head(16, Ordering::Relaxed);
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
    fn frames_must_fit_before_the_end_and_before_the_head() {
        let cap = 64;
        // Valid check, but the frame runs past the end of the data area.
        let ring = HeapRing::new(cap);
        (&ring).store_word(48, encode(48, 9, KIND_DATA));
        (&ring).store_tail(48, Ordering::Relaxed);
        (&ring).store_head(48 + 16, Ordering::Relaxed);
        let mut c = Consumer::new(&ring);
        assert_eq!(
            broken(c.try_peek()),
            Corruption::FrameLength {
                len: 9,
                offset: 48,
                capacity: 64
            }
        );
        // Valid check, fits the area, but ends after the published head.
        let ring = HeapRing::new(cap);
        (&ring).store_word(0, encode(0, 16, KIND_DATA));
        (&ring).store_head(16, Ordering::Relaxed);
        let mut c = Consumer::new(&ring);
        assert_eq!(
            broken(c.try_peek()),
            Corruption::FrameBeyondHead {
                pos: 0,
                end: 24,
                head: 16
            }
        );
        // A huge length.
        let ring = HeapRing::new(cap);
        (&ring).store_word(0, encode(0, u32::MAX, KIND_DATA));
        (&ring).store_head(64, Ordering::Relaxed);
        let mut c = Consumer::new(&ring);
        assert!(matches!(
            broken(c.try_peek()),
            Corruption::FrameLength { len: u32::MAX, .. }
        ));
    }

    #[test]
    fn padding_must_cover_exactly_the_rest_of_the_area() {
        let ring = HeapRing::new(64);
        (&ring).store_word(32, encode(32, 8, KIND_PAD));
        (&ring).store_tail(32, Ordering::Relaxed);
        (&ring).store_head(64, Ordering::Relaxed);
        let mut c = Consumer::new(&ring);
        assert_eq!(
            broken(c.try_peek()),
            Corruption::Padding {
                pos: 32,
                len: 8,
                expected: 24
            }
        );
    }

    #[test]
    fn a_stale_frame_from_the_previous_lap_is_caught() {
        let ring = HeapRing::new(64);
        let mut p = Producer::new(&ring);
        let mut c = Consumer::new(&ring);
        for i in 0..4u8 {
            send(&mut p, &[i; 8]).unwrap();
            recv(&mut c).unwrap();
        }
        // Everything consumed at 64; a head claiming one more lap would show
        // the old frames, whose checks name positions 0..64.
        (&ring).store_head(64 + 16, Ordering::Relaxed);
        assert!(matches!(
            broken(c.try_peek()),
            Corruption::FrameHeader { pos: 64, .. }
        ));
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

    #[test]
    fn fuzz_entry_survives_simple_inputs() {
        crate::fuzz::frame_decoder(&[]);
        crate::fuzz::frame_decoder(&[0xff; 400]);
        crate::fuzz::frame_decoder(&[1; 400]);
        crate::fuzz::frame_decoder(&[2; 333]);
    }

    #[test]
    fn header_round_trips_and_depends_on_position() {
        for &(pos, len) in &[(0u64, 0u32), (8, 1), (4096, 4088), (1 << 40, 77)] {
            let w = encode(pos, len, KIND_DATA);
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
