//! The corrupted-window figure (issue 19): many random corruptions of a live
//! channel, counted. Each episode makes a window of three endpoints, lets
//! messages flow on channel 0<->1 and 0->2, and writes random bytes (1 to 16
//! at a random offset) over the control blocks and data areas of 0<->1
//! between bursts, until the receiver of 0->1 reports the ring broken; then
//! the next episode begins on a fresh window. Throughout: no call panics,
//! every error is one of the documented ones, `Broken` sticks with its
//! cause, the 0->2 channel of the same window delivers every message intact
//! and in order.
//!
//! `SHMEM_RING_CORRUPTIONS=N` sets how many corruptions to make (default
//! 100 000, a few seconds; the README's figure is a run of 1 000 000).

use std::time::{Duration, Instant};

use shmem_ring::{Error, Layout, Window};

mod common;

use common::Rng;

#[derive(Default, Debug)]
struct Tally {
    corruptions: u64,
    episodes: u64,
    /// Episodes whose corruption the receiver caught (the others ran out
    /// of corruptions first: the last one only).
    broken: u64,
    /// Messages delivered on the corrupted ring with a garbled payload (the
    /// transport checks frames, not payloads: counted, not an error).
    garbled: u64,
    delivered: u64,
    clean: u64,
}

#[test]
fn random_corruptions_break_one_channel_each_time_and_never_the_others() {
    let want: u64 = std::env::var("SHMEM_RING_CORRUPTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut rng = Rng(0x00c0_ffee_d00d_f00d);
    let mut t = Tally::default();
    let started = Instant::now();
    while t.corruptions < want {
        episode(&mut rng, &mut t, want);
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} corruptions in {} episodes ({} caught as Broken), {} messages delivered on the \
         corrupted ring ({} with a garbled payload), {} on the clean channel, all intact; {secs:.1} s",
        t.corruptions, t.episodes, t.broken, t.delivered, t.garbled, t.clean
    );
    assert!(t.corruptions >= want);
    // Nearly every episode ends in a caught corruption (not the last).
    assert!(t.broken + 1 >= t.episodes, "{t:?}");
    assert!(t.clean >= t.episodes, "{t:?}");
}

fn episode(rng: &mut Rng, t: &mut Tally, want: u64) {
    t.episodes += 1;
    let layout = Layout::with_capacity(3, 4096).unwrap();
    let w = Window::anonymous(layout).unwrap();
    let (e0, e1, e2) = (
        w.attach(0).unwrap(),
        w.attach(1).unwrap(),
        w.attach(2).unwrap(),
    );
    let (mut tx01, mut rx10) = e0.channel(1).unwrap();
    let (mut tx10, mut rx01) = e1.channel(0).unwrap();
    let (mut tx02, _) = e0.channel(2).unwrap();
    let (_, mut rx02) = e2.channel(0).unwrap();
    let ranges = layout.channel_ranges(0, 1).unwrap().to_vec();
    let (mut msg, mut buf) = (Vec::new(), Vec::new());
    let (mut seq01, mut seq02) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(20);
    let cause = loop {
        assert!(Instant::now() < deadline, "an episode did not end: {t:?}");
        if t.corruptions >= want {
            return;
        }
        // A burst both ways, so that the corruption lands among frames
        // not read yet.
        for _ in 0..16 {
            common::make_message(seq01, common::message_len(seq01, 48), &mut msg);
            match tx01.try_send(&msg) {
                Ok(()) => seq01 += 1,
                Err(Error::Full { .. } | Error::Broken { .. }) => break,
                Err(e) => panic!("sender: {e}"),
            }
            match tx10.try_send(&msg) {
                Ok(()) | Err(Error::Full { .. } | Error::Broken { .. }) => {}
                Err(e) => panic!("sender back: {e}"),
            }
        }
        // One to four corruptions.
        for _ in 0..1 + rng.next() % 4 {
            let (start, len) = ranges[(rng.next() % ranges.len() as u64) as usize];
            let n = 1 + rng.next() % 16;
            let off = start + rng.next() % (len - n);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            w.poke(off, &bytes).unwrap();
            t.corruptions += 1;
        }
        let mut cause = None;
        for rx in [&mut rx01, &mut rx10] {
            loop {
                match rx.try_recv(&mut buf) {
                    Ok(_) => {
                        t.delivered += 1;
                        t.garbled += u64::from(common::check_message(&buf).is_err());
                    }
                    Err(Error::Empty { .. }) => break,
                    Err(Error::Broken { cause: c, .. }) => {
                        cause = cause.or(Some((rx.from(), c)));
                        break;
                    }
                    Err(e) => panic!("receiver {}->{}: {e}", rx.from(), rx.to()),
                }
            }
        }
        // The other channel of the window: untouched, in order.
        common::make_message(seq02, common::message_len(seq02, 200), &mut msg);
        tx02.send(&msg, Duration::from_secs(5)).unwrap();
        rx02.recv(&mut buf, Duration::from_secs(5)).unwrap();
        assert_eq!(common::check_message(&buf), Ok(seq02));
        seq02 += 1;
        t.clean += 1;
        if let Some(c) = cause {
            break c;
        }
    };
    t.broken += 1;
    // Broken sticks, with its cause.
    let (from, broken) = cause;
    let rx = if from == 0 { &mut rx01 } else { &mut rx10 };
    for _ in 0..2 {
        match rx.try_recv(&mut buf) {
            Err(Error::Broken { cause, .. }) => assert_eq!(cause, broken),
            other => panic!("after Broken: {other:?}"),
        }
    }
}
