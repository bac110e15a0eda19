//! Entry points that feed arbitrary bytes to the frame decoder and to the
//! producer's checks of the read position. The `cargo fuzz` target
//! (`fuzz/fuzz_targets/frame_decoder.rs`) and the proptest in `tests/props.rs`
//! run this same code; it is public only for them.
//!
//! The ring lives on the heap here (`HeapRing`): the decoder is the same
//! code as on a window, and the window itself is fuzzed through
//! `Window::poke` in `tests/props.rs`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::layout::FRAME_HEADER;
use crate::ring::{decode, encode, Consumer, Producer, RingMem, TryError, KIND_DATA, KIND_PAD};

/// A ring on the heap, for fuzzing and unit tests.
#[derive(Debug)]
pub(crate) struct HeapRing {
    tail: AtomicU64,
    words: Vec<AtomicU64>,
    bell: AtomicU64,
    /// Times the producer rang the doorbell.
    pub(crate) rings: AtomicU64,
}

impl HeapRing {
    pub(crate) fn new(capacity: usize) -> HeapRing {
        assert!(capacity.is_power_of_two() && capacity >= 16);
        HeapRing {
            tail: AtomicU64::new(0),
            words: (0..capacity / 8).map(|_| AtomicU64::new(0)).collect(),
            bell: AtomicU64::new(0),
            rings: AtomicU64::new(0),
        }
    }

    fn index(&self, pos: u64) -> usize {
        // Truncation keeps the low bits, which are all that select the word.
        (pos as usize / 8) & (self.words.len() - 1)
    }
}

impl RingMem for &HeapRing {
    fn capacity(&self) -> u64 {
        self.words.len() as u64 * 8
    }
    fn load_tail(&self, order: Ordering) -> u64 {
        self.tail.load(order)
    }
    fn store_tail(&self, value: u64, order: Ordering) {
        self.tail.store(value, order);
    }
    fn load_word(&self, pos: u64, order: Ordering) -> u64 {
        self.words[self.index(pos)].load(order)
    }
    fn store_word(&self, pos: u64, value: u64, order: Ordering) {
        self.words[self.index(pos)].store(value, order);
    }
    fn write_payload(&self, off: u64, src: &[u8]) {
        assert!(off + src.len() as u64 <= self.capacity(), "payload wraps");
        for (i, &b) in src.iter().enumerate() {
            let at = off + i as u64;
            let w = &self.words[self.index(at)];
            let mut bytes = w.load(Ordering::Relaxed).to_le_bytes();
            bytes[(at % 8) as usize] = b;
            w.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
    }
    fn read_payload(&self, off: u64, len: usize, dst: &mut Vec<u8>) {
        assert!(off + len as u64 <= self.capacity(), "payload wraps");
        dst.extend((0..len as u64).map(|i| {
            let at = off + i;
            self.words[self.index(at)]
                .load(Ordering::Relaxed)
                .to_le_bytes()[(at % 8) as usize]
        }));
    }
    fn load_bell(&self, order: Ordering) -> u64 {
        self.bell.load(order)
    }
    fn store_bell(&self, value: u64, order: Ordering) {
        self.bell.store(value, order);
    }
    fn swap_bell(&self, current: u64, new: u64) -> bool {
        self.bell
            .compare_exchange(current, new, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
    fn ring_bell(&self) {
        self.rings.fetch_add(1, Ordering::Relaxed);
    }
}

/// Capacity of the fuzzed ring: small, so inputs cover it whole.
const CAP: u64 = 256;

fn words(input: &[u8]) -> impl Iterator<Item = u64> + '_ {
    input.chunks(8).map(|c| {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(b)
    })
}

/// Builds a ring from `input` and drains it with the consumer, checking that
/// whatever the bytes, every outcome is a frame inside the data area, `Empty`,
/// or a `Broken` that sticks; never a panic, never a read outside the ring,
/// never more than the bytes stored. Then lets a producer resume on the
/// same bytes and checks that it never writes past the read position and
/// always leaves the "no frame yet" marker where the consumer looks next.
///
/// Input: read position, then one word per data word; a word whose low two
/// bits are 1 or 2 becomes a data or padding header with a valid check for
/// its position, 3 one valid for the position a lap back (a stale header),
/// with a length from its other bits, so the fuzzer reaches the checks behind
/// the header check; then a read position and lengths for the producer's side.
pub fn frame_decoder(input: &[u8]) {
    let mut w = words(input);
    let tail = w.next().unwrap_or(0);
    let ring = HeapRing::new(CAP as usize);
    let base = tail & !(CAP - 1);
    for i in 0..CAP / 8 {
        let mut pos = base.wrapping_add(i * 8);
        if pos < tail & !7 {
            pos = pos.wrapping_add(CAP);
        }
        let x = w.next().unwrap_or(0);
        let room = CAP - pos % CAP;
        // Lengths that end the frame near the end of the data area, short
        // ones so frames chain, or any up to twice the capacity.
        let len = match (x >> 2) & 3 {
            0 => (room + (x >> 4) % 17).saturating_sub(16) as u32,
            1 => ((x >> 4) % 40) as u32,
            _ => ((x >> 4) % (2 * CAP)) as u32,
        };
        let kind = if (x >> 6) & 1 == 0 {
            KIND_DATA
        } else {
            KIND_PAD
        };
        let word = match x & 3 {
            1 => encode(pos, len, KIND_DATA),
            2 => encode(pos, len, KIND_PAD),
            3 => encode(pos.wrapping_sub(CAP), len, kind),
            _ => x >> 2,
        };
        (&ring).store_word(pos, word, Ordering::Relaxed);
    }
    ring.tail.store(tail, Ordering::Relaxed);

    let mut c = Consumer::new(&ring);
    let mut buf = Vec::new();
    for _ in 0..CAP {
        match c.try_peek() {
            Ok(f) => {
                assert!(f.offset + u64::from(f.len) <= CAP, "frame outside the ring");
                buf.clear();
                c.read(&f, &mut buf);
                assert_eq!(buf.len(), f.len as usize);
                c.release(f);
            }
            Err(TryError::Empty) => break,
            Err(TryError::Broken(cause)) => {
                assert_eq!(c.try_peek().err(), Some(TryError::Broken(cause)));
                break;
            }
            Err(e) => panic!("consumer cannot fail with {e:?}"),
        }
        // The stored bytes are static and were written for positions within
        // one lap of the start: past that, every header names the position a
        // lap back. One frame may straddle that point, hence two laps at most.
        let consumed = ring.tail.load(Ordering::Relaxed).wrapping_sub(tail);
        assert!(consumed <= 2 * CAP, "consumed past two capacities");
    }

    // The producer's side: whatever the read position and the bytes say, it
    // never writes beyond the read position, a bad one breaks the ring, and
    // once it has written a frame the word after its last frame reads as
    // "no frame yet".
    let t = w.next().unwrap_or(0);
    ring.tail.store(t, Ordering::Relaxed);
    let mut p = Producer::new(&ring);
    for len in w.take(16) {
        let len = (len % (CAP + 8)) as usize;
        match p.try_reserve(len) {
            Ok(r) => {
                assert!(r.payload_offset(CAP) - FRAME_HEADER + r.len() as u64 <= CAP);
                p.fill(&r, &vec![0xa5; r.len()]);
                p.commit(r);
                p.publish();
                let end = p.position();
                let filled = end.wrapping_sub(p.seen_tail());
                assert!(filled <= CAP, "wrote past the read position");
                if filled < CAP {
                    let word = (&ring).load_word(end, Ordering::Relaxed);
                    assert!(
                        word == 0 || decode(word, end.wrapping_sub(CAP)).is_ok(),
                        "no marker after the last frame: {word:#x} at {end:#x}"
                    );
                }
            }
            Err(TryError::Full | TryError::TooLarge { .. }) => {}
            Err(TryError::Broken(cause)) => {
                assert_eq!(p.try_reserve(0).err(), Some(TryError::Broken(cause)));
                break;
            }
            Err(TryError::Empty) => panic!("producer cannot be empty"),
        }
    }
}
