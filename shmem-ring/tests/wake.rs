//! The doorbell between two processes on one kernel (the futex): a receiver
//! that has been idle for more than 2 s, waiting in a loop of 100 ms
//! receives as an agent does, sees a message within 1 ms of its sending.
//! Without the doorbell it slept in steps of up to 10 ms and saw it ~5 ms
//! late on average; five rounds and their median keep one scheduling
//! hiccup of a loaded machine from failing the test, and a receiver that
//! polls from passing it.
//!
//! One `#[test]` only: see `common::fork_child`.

use std::time::{Duration, Instant};

use nix::time::{clock_gettime, ClockId};
use shmem_ring::{Error, Window};

mod common;

const ROUNDS: usize = 5;
const IDLE: Duration = Duration::from_millis(2200);
const BOUND: Duration = Duration::from_millis(1);

/// The monotonic clock, the same in both processes.
fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[test]
fn a_receiver_idle_for_seconds_sees_a_message_within_a_millisecond() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let path = dir.path().join("window");
    let w = Window::create(&path, 1 << 20, 2).unwrap();
    let me = w.attach(0).unwrap();

    let child = common::fork_child(|| {
        let w = Window::open(&path).unwrap();
        let peer = w.attach(1).unwrap();
        let (mut tx, _rx) = peer.channel(0).unwrap();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            while start.elapsed() < IDLE {
                peer.heartbeat().unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
            tx.try_send(&now_ns().to_le_bytes()).unwrap();
        }
        // Attached until the last one is surely read.
        std::thread::sleep(Duration::from_millis(300));
        0
    });

    let (_tx, mut rx) = me.channel(1).unwrap();
    assert!(rx.dozes(), "a window on one kernel sleeps on the futex");
    let mut buf = Vec::new();
    let mut late = Vec::new();
    for _ in 0..ROUNDS {
        let t0 = Instant::now();
        loop {
            match rx.recv(&mut buf, Duration::from_millis(100)) {
                Ok(_) => break,
                Err(Error::Timeout { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let got = now_ns();
        assert!(t0.elapsed() >= IDLE / 2, "the message came early");
        let sent = u64::from_le_bytes(buf[..8].try_into().unwrap());
        late.push(Duration::from_nanos(got.saturating_sub(sent)));
    }
    assert_eq!(common::wait_child(child), 0);
    late.sort();
    let median = late[ROUNDS / 2];
    eprintln!("first message after {IDLE:?} idle, {ROUNDS} rounds: {late:?}");
    assert!(
        median < BOUND,
        "median {median:?} is not under {BOUND:?} (all: {late:?})"
    );
}
