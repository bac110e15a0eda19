//! The loom model of the ring's index protocol (`ring.rs`).
//!
//! Loom explores the interleavings and the weak-memory outcomes of threads on
//! the heap, not of a window shared between processes, so the very same
//! `Producer`/`Consumer` code runs here on a heap-allocated [`RingMem`]: the
//! tail is a loom atomic, every 8-byte data word is a loom atomic for the
//! accesses that go through atomics in the window too (frame headers and
//! markers, the words that steer the consumer), and the payload bytes are
//! loom cells (`raw::LoomCells`) accessed as plain memory. Writing a payload
//! also overwrites the atomics of the words it covers with payload bytes, as
//! in the window, where headers and payloads share the memory: a header
//! position whose marker was not written in time then shows payload bytes
//! and breaks the ring. Loom fails the model on any access to a payload byte
//! that the protocol's Release/Acquire pairs do not order after the previous
//! access by the other side (a payload read before its header was
//! published, or overwritten before the consumer released it); the content
//! and order checks catch the rest. The mapping itself is tested separately
//! (tests/).
//!
//! The doorbell (`ring.rs`, "The doorbell") is modelled too: the doorbell
//! word is a loom atomic, the fences are loom's, and the futex is a loom
//! mutex and condition variable: `FUTEX_WAIT` checks the word under the
//! lock and waits, `FUTEX_WAKE` notifies under it, which is what the
//! kernel's hash-bucket lock does. The consumer sleeps without a timeout;
//! the producer, when it has sent everything, says so under the same lock,
//! and a consumer woken by that rather than by a ring (its word still says
//! asleep while it still expects a message) has lost a wake-up: in a
//! receiver that sleep would last until its timeout. Two mutants show that
//! the model can fail: a consumer that sleeps without looking at the ring
//! after its announcement, and both sides without their fences
//! (`loom_*_loses_a_wake_up`, expected to panic).
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p shmem-ring --release --lib loom_model`

use std::sync::atomic::Ordering;

use loom::sync::atomic::AtomicU64;
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use crate::raw::LoomCells;
use crate::ring::{Consumer, Producer, RingMem, TryError, BELL_ASLEEP};

#[derive(Debug)]
struct Model {
    tail: AtomicU64,
    words: Vec<AtomicU64>,
    bytes: LoomCells,
    bell: AtomicU64,
    /// The futex's wait queue: its lock (guarding whether the producer
    /// has sent everything) and its sleepers.
    futex: Mutex<bool>,
    sleepers: Condvar,
    /// Whether `RingMem::fence` fences (false only in a mutant).
    fenced: bool,
}

#[derive(Debug, Clone)]
struct Mem(Arc<Model>);

impl Mem {
    fn new(capacity: usize) -> Mem {
        Mem::with_fences(capacity, true)
    }

    fn with_fences(capacity: usize, fenced: bool) -> Mem {
        Mem(Arc::new(Model {
            tail: AtomicU64::new(0),
            words: (0..capacity / 8).map(|_| AtomicU64::new(0)).collect(),
            bytes: LoomCells::new(capacity),
            bell: AtomicU64::new(0),
            futex: Mutex::new(false),
            sleepers: Condvar::new(),
            fenced,
        }))
    }

    fn at(&self, pos: u64) -> usize {
        (pos % self.capacity()) as usize
    }

    /// `FUTEX_WAIT` on the doorbell word: sleeps while it says asleep,
    /// until a wake; fails the model if only the producer's end woke it.
    fn futex_wait(&self) {
        let mut done = self.0.futex.lock().unwrap();
        if self.0.bell.load(Ordering::Relaxed) == BELL_ASLEEP && !*done {
            done = self.0.sleepers.wait(done).unwrap();
        }
        assert!(
            !(*done && self.0.bell.load(Ordering::Relaxed) == BELL_ASLEEP),
            "lost wake-up: the producer sent its last message without ringing a consumer that sleeps"
        );
    }

    /// The producer has sent everything (and would not ring again).
    fn producer_done(&self) {
        *self.0.futex.lock().unwrap() = true;
        self.0.sleepers.notify_all();
    }
}

impl RingMem for Mem {
    fn capacity(&self) -> u64 {
        self.0.bytes.len() as u64
    }
    fn load_tail(&self, order: Ordering) -> u64 {
        self.0.tail.load(order)
    }
    fn store_tail(&self, value: u64, order: Ordering) {
        self.0.tail.store(value, order);
    }
    fn load_word(&self, pos: u64, order: Ordering) -> u64 {
        self.0.words[self.at(pos) / 8].load(order)
    }
    fn store_word(&self, pos: u64, value: u64, order: Ordering) {
        self.0.words[self.at(pos) / 8].store(value, order);
    }
    fn write_payload(&self, off: u64, src: &[u8]) {
        let at = self.at(off);
        assert!(at + src.len() <= self.0.bytes.len(), "payload wraps");
        for (i, &x) in src.iter().enumerate() {
            self.0.bytes.write(at + i, x);
        }
        // Payloads start 8-aligned (after a header); the words they cover
        // now hold payload bytes.
        for (k, chunk) in src.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0.words[at / 8 + k].store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
    }
    fn read_payload(&self, off: u64, len: usize, dst: &mut Vec<u8>) {
        let at = self.at(off);
        assert!(at + len <= self.0.bytes.len(), "payload wraps");
        dst.extend((0..len).map(|i| self.0.bytes.read(at + i)));
    }
    fn load_bell(&self, order: Ordering) -> u64 {
        self.0.bell.load(order)
    }
    fn store_bell(&self, value: u64, order: Ordering) {
        self.0.bell.store(value, order);
    }
    fn swap_bell(&self, current: u64, new: u64) -> bool {
        self.0
            .bell
            .compare_exchange(current, new, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
    fn fence(&self) {
        if self.0.fenced {
            loom::sync::atomic::fence(Ordering::SeqCst);
        }
    }
    /// `FUTEX_WAKE`.
    fn ring_bell(&self) {
        let _queue = self.0.futex.lock().unwrap();
        self.0.sleepers.notify_all();
    }
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j + 1) as u8).collect()
}

/// One producer thread sends `sizes` (publishing every `batch` frames), the
/// main thread receives and checks each payload in order.
fn model(capacity: usize, sizes: &'static [usize], batch: usize) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(move || {
        let mem = Mem::new(capacity);
        let mut producer = Producer::new(mem.clone());
        let mut consumer = Consumer::new(mem);
        let t = thread::spawn(move || {
            for (i, &len) in sizes.iter().enumerate() {
                let msg = payload(i, len);
                // `send` takes its fast path while the frame fits in the
                // room known, and `try_reserve`'s general one otherwise.
                loop {
                    match producer.send(&msg, (i + 1) % batch == 0) {
                        Ok(()) => break,
                        Err(TryError::Full) => thread::yield_now(),
                        Err(e) => panic!("producer: {e:?}"),
                    }
                }
            }
            producer.publish();
        });
        let mut buf = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            loop {
                // The blocking receive's `poll` and `try_peek`, in turn.
                let next = if i % 2 == 0 {
                    consumer.poll()
                } else {
                    consumer.try_peek()
                };
                match next {
                    Ok(f) => {
                        buf.clear();
                        consumer.read(&f, &mut buf);
                        assert_eq!(buf, payload(i, len), "message {i}");
                        consumer.release(f);
                        break;
                    }
                    Err(TryError::Empty) => thread::yield_now(),
                    Err(e) => panic!("consumer: {e:?}"),
                }
            }
        }
        assert_eq!(consumer.try_peek().err(), Some(TryError::Empty));
        t.join().unwrap();
    });
}

#[test]
fn loom_fills_the_ring_and_waits_for_room() {
    // 16-byte frames in a 32-byte ring: the third waits for the first release.
    model(32, &[8, 1, 7], 1);
}

#[test]
fn loom_pads_to_the_end_and_wraps() {
    // 16 + 24 > 32: the second frame needs padding and a wrap to offset 0;
    // the padding fills the ring exactly, so the consumer finds the first
    // frame's header (one lap back) instead of a marker after it.
    model(32, &[5, 12, 0], 1);
}

#[test]
fn loom_batched_publish() {
    // Three frames published by one store; the ring fills on the fourth,
    // which must publish the batch before it waits.
    model(64, &[3, 9, 2, 20], 4);
}

/// How the consumer of [`doorbell_model`] goes to sleep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sleep {
    /// As `Receiver::doze` does: announce, look again, then sleep.
    Correct,
    /// Mutant: announce and sleep without the second look.
    NoSecondLook,
}

/// One producer thread sends `sizes`, publishing every `batch` frames (and
/// checking the doorbell after each publish); the consumer never spins:
/// whenever the ring is empty it goes to sleep on the doorbell, and it must
/// still get every message. `fenced: false` takes the fences out of both
/// sides.
fn doorbell_model(sizes: &'static [usize], batch: usize, sleep: Sleep, fenced: bool) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(move || {
        let mem = Mem::with_fences(64, fenced);
        let mut producer = Producer::new(mem.clone());
        let mut consumer = Consumer::new(mem.clone());
        let t = thread::spawn(move || {
            for (i, &len) in sizes.iter().enumerate() {
                let msg = payload(i, len);
                loop {
                    match producer.send(&msg, (i + 1) % batch == 0) {
                        Ok(()) => break,
                        Err(TryError::Full) => thread::yield_now(),
                        Err(e) => panic!("producer: {e:?}"),
                    }
                }
            }
            producer.publish();
            producer.mem().producer_done();
        });
        let mut buf = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let frame = loop {
                match consumer.poll() {
                    Ok(f) => break f,
                    Err(TryError::Empty) => {}
                    Err(e) => panic!("consumer: {e:?}"),
                }
                let second_look = match sleep {
                    Sleep::Correct => consumer.prepare_sleep(),
                    Sleep::NoSecondLook => {
                        consumer.announce_sleep();
                        Err(TryError::Empty)
                    }
                };
                match second_look {
                    Ok(f) => break f,
                    Err(TryError::Empty) => {
                        mem.futex_wait();
                        consumer.awake();
                    }
                    Err(e) => panic!("consumer: {e:?}"),
                }
            };
            buf.clear();
            consumer.read(&frame, &mut buf);
            assert_eq!(buf, payload(i, len), "message {i}");
            consumer.release(frame);
        }
        t.join().unwrap();
    });
}

#[test]
fn loom_doorbell_wakes_a_sleeping_consumer_for_every_message() {
    doorbell_model(&[8, 3], 1, Sleep::Correct, true);
}

#[test]
fn loom_doorbell_after_a_batched_publish() {
    // Two frames become visible with one store, and one ring.
    doorbell_model(&[8, 3, 5], 2, Sleep::Correct, true);
}

#[test]
#[should_panic(expected = "lost wake-up")]
fn loom_sleep_without_a_second_look_loses_a_wake_up() {
    doorbell_model(&[8, 3], 1, Sleep::NoSecondLook, true);
}

#[test]
#[should_panic(expected = "lost wake-up")]
fn loom_doorbell_without_fences_loses_a_wake_up() {
    doorbell_model(&[8, 3], 1, Sleep::Correct, false);
}
