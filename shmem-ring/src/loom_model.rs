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
//! Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p shmem-ring --release --lib loom_model`

use std::sync::atomic::Ordering;

use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use loom::thread;

use crate::raw::LoomCells;
use crate::ring::{Consumer, Producer, RingMem, TryError};

#[derive(Debug)]
struct Model {
    tail: AtomicU64,
    words: Vec<AtomicU64>,
    bytes: LoomCells,
}

#[derive(Debug, Clone)]
struct Mem(Arc<Model>);

impl Mem {
    fn new(capacity: usize) -> Mem {
        Mem(Arc::new(Model {
            tail: AtomicU64::new(0),
            words: (0..capacity / 8).map(|_| AtomicU64::new(0)).collect(),
            bytes: LoomCells::new(capacity),
        }))
    }

    fn at(&self, pos: u64) -> usize {
        (pos % self.capacity()) as usize
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
