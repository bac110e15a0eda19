//! Property tests: random frame sizes and operation mixes against a model of
//! the ring, the frame decoder on arbitrary bytes (the CI stand-in for the
//! `cargo fuzz` target), and arbitrary bytes poked into a live window.

use std::collections::VecDeque;

use proptest::prelude::*;
use shmem_ring::{Error, Layout, Window};

const CAP: u64 = 4096;

#[derive(Clone, Debug)]
enum Op {
    Send(usize),
    SendBatched(usize),
    Reserve(usize, Commit),
    Flush,
    Recv,
    Peek { release: bool },
}

#[derive(Clone, Copy, Debug)]
enum Commit {
    Now,
    Batched,
    Abandon,
}

fn len() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..64,
        3 => 0usize..700,
        2 => 2000usize..=4088,
        1 => Just(4088usize),
        1 => Just(4089usize),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let commit = prop_oneof![
        Just(Commit::Now),
        Just(Commit::Batched),
        Just(Commit::Abandon)
    ];
    prop_oneof![
        4 => len().prop_map(Op::Send),
        2 => len().prop_map(Op::SendBatched),
        2 => (len(), commit).prop_map(|(l, c)| Op::Reserve(l, c)),
        1 => Just(Op::Flush),
        5 => Just(Op::Recv),
        2 => any::<bool>().prop_map(|release| Op::Peek { release }),
    ]
}

/// The specification of the ring, in positions: what should be accepted,
/// when it should be full, and what the receiver should see.
#[derive(Debug, Default)]
struct Model {
    head: u64,
    tail: u64,
    /// Records (padding: None) written but not yet published.
    pending: VecDeque<(u64, Option<Vec<u8>>)>,
    /// Records published and not yet consumed.
    visible: VecDeque<(u64, Option<Vec<u8>>)>,
}

impl Model {
    fn publish(&mut self) {
        self.visible.extend(self.pending.drain(..));
    }

    /// Where a frame of `len` bytes would go: Ok(true) with padding first,
    /// Err(()) when the ring is full (after writing padding if it fits).
    fn reserve(&mut self, len: usize) -> Result<(), ()> {
        let frame = 8 + ((len as u64 + 7) & !7);
        let room = CAP - self.head % CAP;
        if frame > room {
            if self.head - self.tail + room > CAP {
                self.publish();
                return Err(());
            }
            self.pending.push_back((room, None));
            self.head += room;
        }
        if self.head - self.tail + frame > CAP {
            self.publish();
            return Err(());
        }
        Ok(())
    }

    fn commit(&mut self, msg: Vec<u8>) {
        let frame = 8 + ((msg.len() as u64 + 7) & !7);
        self.pending.push_back((frame, Some(msg)));
        self.head += frame;
    }

    /// The next message, skipping (and consuming) padding.
    fn front(&mut self) -> Option<&Vec<u8>> {
        while let Some((size, None)) = self.visible.front() {
            self.tail += size;
            self.visible.pop_front();
        }
        self.visible.front().and_then(|(_, m)| m.as_ref())
    }

    fn pop(&mut self) {
        let (size, _) = self.visible.pop_front().unwrap();
        self.tail += size;
    }
}

fn content(n: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (n as usize * 7 + i) as u8).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_sizes_and_operations_match_the_model(ops in proptest::collection::vec(op(), 1..300)) {
        let w = Window::anonymous(Layout::with_capacity(2, CAP).unwrap()).unwrap();
        let (a, b) = (w.attach(0).unwrap(), w.attach(1).unwrap());
        let (mut tx, _) = a.channel(1).unwrap();
        let (_, mut rx) = b.channel(0).unwrap();
        let mut m = Model::default();
        let mut n = 0u64;
        let mut buf = Vec::new();
        for op in ops {
            match op {
                Op::Send(len) | Op::SendBatched(len) | Op::Reserve(len, _) if len > 4088 => {
                    let r = match op {
                        Op::Reserve(..) => tx.try_reserve(len).map(|_| ()),
                        _ => tx.try_send(&vec![0; len]),
                    };
                    let refused = matches!(r, Err(Error::TooLarge { max: 4088, .. }));
                    prop_assert!(refused, "{len} bytes accepted");
                }
                Op::Send(len) | Op::SendBatched(len) => {
                    let msg = content(n, len);
                    n += 1;
                    let batched = matches!(op, Op::SendBatched(_));
                    let r = if batched { tx.try_send_batched(&msg) } else { tx.try_send(&msg) };
                    match (m.reserve(len), r) {
                        (Ok(()), Ok(())) => {
                            m.commit(msg);
                            if !batched { m.publish(); }
                        }
                        (Err(()), Err(Error::Full { .. })) => {}
                        (want, got) => prop_assert!(false, "model {want:?}, ring {got:?}"),
                    }
                }
                Op::Reserve(len, commit) => {
                    let msg = content(n, len);
                    n += 1;
                    match (m.reserve(len), tx.try_reserve(len)) {
                        (Ok(()), Ok(mut slot)) => {
                            prop_assert_eq!(slot.len(), len);
                            slot.copy_from_slice(&msg);
                            match commit {
                                Commit::Now => { slot.commit(); m.commit(msg); m.publish(); }
                                Commit::Batched => { slot.commit_batched(); m.commit(msg); }
                                Commit::Abandon => {}
                            }
                        }
                        (Err(()), Err(Error::Full { .. })) => {}
                        (want, got) => prop_assert!(false, "model {want:?}, ring {:?}", got.map(|s| s.len())),
                    }
                }
                Op::Flush => { tx.flush(); m.publish(); }
                Op::Recv => {
                    let want = m.front().cloned();
                    match (want, rx.try_recv(&mut buf)) {
                        (Some(msg), Ok(len)) => { prop_assert_eq!(len, msg.len()); prop_assert_eq!(&buf, &msg); m.pop(); }
                        (None, Err(Error::Empty { .. })) => {}
                        (want, got) => prop_assert!(false, "model {want:?}, ring {got:?}"),
                    }
                }
                Op::Peek { release } => {
                    let want = m.front().cloned();
                    match (want, rx.try_peek()) {
                        (Some(msg), Ok(slot)) => {
                            prop_assert_eq!(&*slot, &msg[..]);
                            if release { slot.release(); m.pop(); }
                        }
                        (None, Err(Error::Empty { .. })) => {}
                        (want, got) => prop_assert!(false, "model {want:?}, ring {:?}", got.map(|s| s.len())),
                    }
                }
            }
        }
        // Drain: everything committed arrives, in order.
        tx.flush();
        m.publish();
        while let Some(msg) = m.front().cloned() {
            prop_assert_eq!(rx.try_recv(&mut buf).unwrap(), msg.len());
            prop_assert_eq!(&buf, &msg);
            m.pop();
        }
        let empty = matches!(rx.try_recv(&mut buf), Err(Error::Empty { .. }));
        prop_assert!(empty, "more messages than were sent");
    }


    #[test]
    fn arbitrary_bytes_in_a_live_ring_break_only_that_ring(
        prefill in 0usize..40,
        pokes in proptest::collection::vec((0u64..(256 + CAP), proptest::collection::vec(any::<u8>(), 1..24)), 1..12),
        head_delta in prop_oneof![any::<u64>(), (0u64..=CAP + 64).prop_map(|d| d & !7)],
        set_head in any::<bool>(),
    ) {
        let w = Window::anonymous(Layout::with_capacity(3, CAP).unwrap()).unwrap();
        let (e0, e1, e2) = (w.attach(0).unwrap(), w.attach(1).unwrap(), w.attach(2).unwrap());
        let (mut tx01, _) = e0.channel(1).unwrap();
        let (_, mut rx01) = e1.channel(0).unwrap();
        let (mut tx02, _) = e0.channel(2).unwrap();
        let (_, mut rx02) = e2.channel(0).unwrap();
        let mut buf = Vec::new();
        for i in 0..prefill {
            tx01.try_send(&content(i as u64, i * 13 % 200)).unwrap_or(());
            if i % 3 == 0 { let _ = rx01.try_recv(&mut buf); }
            tx02.try_send(&content(i as u64, i * 13 % 200)).unwrap_or(());
        }
        let ring = w.layout().ring(0, 1).unwrap();
        for (at, bytes) in &pokes {
            let off = if *at < 256 { ring.control + at } else { ring.data + (at - 256) };
            let end = if *at < 256 { ring.control + 256 } else { ring.data + CAP };
            let n = bytes.len().min((end - off) as usize);
            w.poke(off, &bytes[..n]).unwrap();
        }
        if set_head {
            let mut tail = [0u8; 8];
            w.read_raw(ring.control + 0x80, &mut tail).unwrap();
            let head = u64::from_le_bytes(tail).wrapping_add(head_delta);
            w.poke(ring.control, &head.to_le_bytes()).unwrap();
        }
        // The scribbled ring: messages within bounds, Empty, or Broken for good.
        for _ in 0..100 {
            match rx01.try_recv(&mut buf) {
                Ok(len) => prop_assert!(len <= w.layout().max_message()),
                Err(Error::Empty { .. }) => break,
                Err(Error::Broken { cause, .. }) => {
                    let again = rx01.try_recv(&mut buf);
                    let sticky = matches!(again, Err(Error::Broken { cause: c, .. }) if c == cause);
                    prop_assert!(sticky, "{again:?}");
                    break;
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
        for _ in 0..20 {
            match tx01.try_send(b"more") {
                Ok(()) | Err(Error::Full { .. }) | Err(Error::Broken { .. }) => {}
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
        // The other ring delivers all it was given, intact.
        for i in 0..prefill {
            prop_assert_eq!(rx02.try_recv(&mut buf).unwrap(), i * 13 % 200);
            prop_assert_eq!(&buf, &content(i as u64, i * 13 % 200));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// The CI stand-in for `cargo fuzz run frame_decoder`: same entry point.
    #[test]
    fn frame_decoder_survives_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        shmem_ring::fuzz::frame_decoder(&input);
    }
}
