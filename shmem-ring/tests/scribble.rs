//! A hostile peer: another process scribbles random bytes over one live
//! channel while messages flow on it and on another channel of the same
//! window. The receiver of the scribbled channel must get `Broken` (and keep
//! getting it), never panic, and the other channel must keep delivering
//! every message intact and in order.
//!
//! One `#[test]` only: see `common::fork_child`.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use shmem_ring::{Error, Layout, Window};

mod common;

use common::Rng;

/// Which bytes the scribbler may hit.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// Only the data area of ring 0->1: the frame decoder must catch it.
    Data,
    /// Control blocks and data areas of both rings between 0 and 1.
    WholeChannel,
}

fn scribble(w: &Window, target: Target, seed: u64) -> ! {
    let layout = *w.layout();
    let ranges: Vec<(u64, u64)> = match target {
        Target::Data => {
            let r = layout.ring(0, 1).unwrap();
            vec![(r.data, r.capacity)]
        }
        Target::WholeChannel => layout.channel_ranges(0, 1).unwrap().to_vec(),
    };
    let mut rng = Rng(seed | 1);
    loop {
        let (start, len) = ranges[(rng.next() % ranges.len() as u64) as usize];
        let n = 1 + rng.next() % 16;
        let off = start + rng.next() % (len - n);
        let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        w.poke(off, &bytes).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn run(target: Target) {
    let layout = Layout::with_capacity(3, 4096).unwrap();
    let w = Window::anonymous(layout).unwrap();
    let (e0, e1, e2) = (
        w.attach(0).unwrap(),
        w.attach(1).unwrap(),
        w.attach(2).unwrap(),
    );
    let (mut tx01, _rx10) = e0.channel(1).unwrap();
    let (_tx10, mut rx01) = e1.channel(0).unwrap();
    let (mut tx02, _) = e0.channel(2).unwrap();
    let (_, mut rx02) = e2.channel(0).unwrap();

    let scribbler = common::fork_child(|| scribble(&w, target, 0x5eed ^ target as u64));

    let mut msg = Vec::new();
    let mut buf = Vec::new();
    let (mut seq01, mut seq02) = (0u64, 0u64);
    let mut garbled = 0u64;
    let started = Instant::now();
    let broken = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no corruption detected after {seq01} messages on the scribbled ring"
        );
        // A burst, then drain it: most of the ring holds frames not yet
        // read, so a scribble soon lands on a header the receiver will
        // check (one frame at a time left it live for a few ns only, and
        // how soon a scribble hit it was down to luck).
        for _ in 0..32 {
            common::make_message(seq01, common::message_len(seq01, 48), &mut msg);
            match tx01.try_send(&msg) {
                Ok(()) => seq01 += 1,
                Err(Error::Full { .. }) => break,
                // The sender may find the read position scribbled first.
                Err(Error::Broken { .. }) => break,
                Err(e) => panic!("sender of the scribbled ring: {e}"),
            }
        }
        let mut cause = None;
        loop {
            match rx01.try_recv(&mut buf) {
                // Payload bytes are not the transport's to check: count them.
                Ok(_) => garbled += u64::from(common::check_message(&buf).is_err()),
                Err(Error::Empty { .. }) => break,
                Err(Error::Broken {
                    from: 0,
                    to: 1,
                    cause: c,
                }) => {
                    cause = Some(c);
                    break;
                }
                Err(e) => panic!("receiver of the scribbled ring: {e}"),
            }
        }
        if let Some(c) = cause {
            break c;
        }

        // The other channel of the same window is untouched.
        common::make_message(seq02, common::message_len(seq02, 48), &mut msg);
        tx02.send(&msg, Duration::from_secs(5)).unwrap();
        rx02.recv(&mut buf, Duration::from_secs(5)).unwrap();
        assert_eq!(common::check_message(&buf), Ok(seq02));
        seq02 += 1;
    };
    kill(scribbler, Signal::SIGKILL).unwrap();
    assert_eq!(common::wait_child(scribbler), -(Signal::SIGKILL as i32));
    eprintln!(
        "{target:?}: broken after {seq01} messages ({garbled} with garbled payload): {broken}"
    );
    if let Target::Data = target {
        assert!(
            matches!(
                broken,
                shmem_ring::Corruption::FrameHeader { .. }
                    | shmem_ring::Corruption::FrameLength { .. }
                    | shmem_ring::Corruption::Padding { .. }
            ),
            "{broken}"
        );
    }

    // Broken sticks, with the same cause, and is flagged to the sender.
    for _ in 0..3 {
        match rx01.try_recv(&mut buf) {
            Err(Error::Broken { cause, .. }) => assert_eq!(cause, broken),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(rx01.broken(), Some(broken));
    let mut flagged = false;
    for _ in 0..10_000 {
        match tx01.try_send(b"x") {
            Err(Error::Broken { .. }) => {
                flagged = true;
                break;
            }
            Ok(()) | Err(Error::Full { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(flagged, "the sender never learnt the ring is broken");

    // The other channel goes on as if nothing happened.
    for _ in 0..10_000 {
        common::make_message(seq02, common::message_len(seq02, 200), &mut msg);
        tx02.send(&msg, Duration::from_secs(5)).unwrap();
        rx02.recv(&mut buf, Duration::from_secs(5)).unwrap();
        assert_eq!(common::check_message(&buf), Ok(seq02));
        seq02 += 1;
    }
}

#[test]
fn scribbling_breaks_one_channel_and_the_others_keep_flowing() {
    run(Target::Data);
    run(Target::WholeChannel);
}
