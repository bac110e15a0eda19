//! The loom model of the ring's index protocol (`ring.rs`).
//!
//! Loom explores the interleavings and the weak-memory outcomes of threads on
//! the heap, not of a window shared between processes, so the very same
//! `Producer`/`Consumer` code runs here on a heap-allocated [`RingMem`]: head
//! and tail are loom atomics, and the data area is loom cells (`raw::LoomCells`)
//! accessed as plain memory, headers included. Loom fails the model on any
//! access to a data byte that the protocol's Release/Acquire pairs do not order
//! after the previous access by the other side (a payload read before it was
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
    head: AtomicU64,
    tail: AtomicU64,
    data: LoomCells,
}

#[derive(Debug, Clone)]
struct Mem(Arc<Model>);

impl Mem {
    fn new(capacity: usize) -> Mem {
        Mem(Arc::new(Model {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            data: LoomCells::new(capacity),
        }))
    }

    fn at(&self, pos: u64) -> usize {
        (pos % self.capacity()) as usize
    }
}

impl RingMem for Mem {
    fn capacity(&self) -> u64 {
        self.0.data.len() as u64
    }
    fn load_head(&self, order: Ordering) -> u64 {
        self.0.head.load(order)
    }
    fn store_head(&self, value: u64, order: Ordering) {
        self.0.head.store(value, order);
    }
    fn load_tail(&self, order: Ordering) -> u64 {
        self.0.tail.load(order)
    }
    fn store_tail(&self, value: u64, order: Ordering) {
        self.0.tail.store(value, order);
    }
    fn load_word(&self, pos: u64) -> u64 {
        let at = self.at(pos) & !7;
        let mut b = [0u8; 8];
        for (i, x) in b.iter_mut().enumerate() {
            *x = self.0.data.read(at + i);
        }
        u64::from_le_bytes(b)
    }
    fn store_word(&self, pos: u64, value: u64) {
        let at = self.at(pos) & !7;
        for (i, x) in value.to_le_bytes().into_iter().enumerate() {
            self.0.data.write(at + i, x);
        }
    }
    fn write_payload(&self, off: u64, src: &[u8]) {
        let at = self.at(off);
        assert!(at + src.len() <= self.0.data.len(), "payload wraps");
        for (i, &x) in src.iter().enumerate() {
            self.0.data.write(at + i, x);
        }
    }
    fn read_payload(&self, off: u64, len: usize, dst: &mut Vec<u8>) {
        let at = self.at(off);
        assert!(at + len <= self.0.data.len(), "payload wraps");
        dst.extend((0..len).map(|i| self.0.data.read(at + i)));
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
                loop {
                    match producer.try_reserve(len) {
                        Ok(r) => {
                            producer.fill(&r, &msg);
                            producer.commit(r);
                            if (i + 1) % batch == 0 {
                                producer.publish();
                            }
                            break;
                        }
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
                match consumer.try_peek() {
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
    // 16 + 24 > 32: the second frame needs padding and a wrap to offset 0.
    model(32, &[5, 12, 0], 1);
}

#[test]
fn loom_batched_publish() {
    // Three frames published by one store; the ring fills on the fourth,
    // which must publish the batch before it waits.
    model(64, &[3, 9, 2, 20], 4);
}
