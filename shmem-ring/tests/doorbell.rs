//! Doorbells seen from outside: busy traffic does not ring, every ring
//! answers an announced sleep, a doorbell that cannot wait falls back to
//! polling, endpoints without one still talk, and a relay that wakes a
//! receiver through `Window::bell` (as the QEMU daemon does for a ring that
//! came from a guest) works.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmem_ring::{Bell, Doorbell, Error, FutexBell, Layout, Liveness, Window};

const LONG: Duration = Duration::from_secs(30);

/// The futex doorbell, counting what goes through it.
#[derive(Debug, Default)]
struct Counting {
    rings: AtomicU64,
    waits: AtomicU64,
}

impl Doorbell for Counting {
    fn ring(&self, bell: &Bell) {
        self.rings.fetch_add(1, Ordering::Relaxed);
        FutexBell.ring(bell);
    }
    fn wait(&self, bell: &Bell, deadline: Instant) -> io::Result<()> {
        self.waits.fetch_add(1, Ordering::Relaxed);
        FutexBell.wait(bell, deadline)
    }
}

fn window() -> Window {
    Window::anonymous(Layout::with_capacity(2, 64 << 10).unwrap()).unwrap()
}

#[test]
fn busy_traffic_rings_only_for_sleeps_it_ended() {
    const MESSAGES: u64 = 200_000;
    let w = window();
    let bell = Arc::new(Counting::default());
    let a = w
        .attach_with_doorbell(0, Liveness::default(), Some(bell.clone()))
        .unwrap();
    let b = w
        .attach_with_doorbell(1, Liveness::default(), Some(bell.clone()))
        .unwrap();
    let (mut tx, _) = a.channel(1).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();
    let receiver = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for i in 0..MESSAGES {
            rx.recv(&mut buf, LONG).unwrap();
            assert_eq!(buf, i.to_le_bytes());
        }
    });
    for i in 0..MESSAGES {
        tx.send(&i.to_le_bytes(), LONG).unwrap();
    }
    receiver.join().unwrap();
    let (rings, waits) = (
        bell.rings.load(Ordering::Relaxed),
        bell.waits.load(Ordering::Relaxed),
    );
    eprintln!("{MESSAGES} messages: {rings} rings, {waits} sleeps");
    // One ring at most per announced sleep (each sleep announces once
    // before its wait); and a sleep only when the sender stalled.
    assert!(rings <= waits, "{rings} rings for {waits} sleeps");
    assert!(rings <= MESSAGES / 100, "{rings} rings: busy traffic rang");
}

/// A doorbell whose wait fails, as a futex on a PCI BAR does (`EFAULT`).
#[derive(Debug)]
struct CannotWait;

impl Doorbell for CannotWait {
    fn ring(&self, _: &Bell) {}
    fn wait(&self, _: &Bell, _: Instant) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(14))
    }
}

#[test]
fn a_doorbell_that_cannot_wait_falls_back_to_polling() {
    let w = window();
    let a = w.attach(0).unwrap();
    let b = w
        .attach_with_doorbell(1, Liveness::default(), Some(Arc::new(CannotWait)))
        .unwrap();
    let (mut tx, _) = a.channel(1).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();
    let mut buf = Vec::new();
    assert!(rx.dozes());
    assert!(matches!(
        rx.recv(&mut buf, Duration::from_millis(20)),
        Err(Error::Timeout { .. })
    ));
    assert!(!rx.dozes(), "still trying a doorbell that failed");
    // The sender sees no announcement (it would ring for nothing) and the
    // message still arrives.
    assert!(!w.bell(0, 1).unwrap().asleep());
    tx.try_send(b"polled").unwrap();
    rx.recv(&mut buf, Duration::from_secs(5)).unwrap();
    assert_eq!(buf, b"polled");
}

#[test]
fn endpoints_without_a_doorbell_poll_and_never_announce() {
    let w = window();
    let a = w
        .attach_with_doorbell(0, Liveness::default(), None)
        .unwrap();
    let b = w
        .attach_with_doorbell(1, Liveness::default(), None)
        .unwrap();
    let (mut tx, _) = a.channel(1).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();
    assert!(!rx.dozes());
    let mut buf = Vec::new();
    assert!(rx.recv(&mut buf, Duration::from_millis(20)).is_err());
    assert!(!w.bell(0, 1).unwrap().asleep());
    tx.try_send(b"hi").unwrap();
    rx.recv(&mut buf, Duration::from_secs(5)).unwrap();
    assert_eq!(buf, b"hi");
}

/// A sender on "another kernel": its ring goes to a relay thread, which
/// wakes the receiver with `Window::bell(..).futex_wake()`.
#[derive(Debug)]
struct ToRelay(crossbeam_channel::Sender<(u16, u16)>);

impl Doorbell for ToRelay {
    fn ring(&self, bell: &Bell) {
        let _ = self.0.send((bell.from(), bell.to()));
    }
    fn wait(&self, _: &Bell, _: Instant) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[test]
fn a_relay_wakes_the_receiver_through_the_window_bell() {
    let w = window();
    let (relay_tx, relay_rx) = crossbeam_channel::unbounded::<(u16, u16)>();
    let far = w
        .attach_with_doorbell(0, Liveness::default(), Some(Arc::new(ToRelay(relay_tx))))
        .unwrap();
    let near = w.attach(1).unwrap();
    let relay_window = w.clone();
    let relay = std::thread::spawn(move || {
        let mut relayed = 0;
        while let Ok((from, to)) = relay_rx.recv() {
            relay_window.bell(from, to).unwrap().futex_wake().unwrap();
            relayed += 1;
        }
        relayed
    });
    let (mut tx, _) = far.channel(1).unwrap();
    let (_, mut rx) = near.channel(0).unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..3u8 {
            std::thread::sleep(Duration::from_millis(200));
            tx.try_send(&[i]).unwrap();
        }
    });
    let mut buf = Vec::new();
    for i in 0..3u8 {
        let t = Instant::now();
        rx.recv(&mut buf, Duration::from_secs(5)).unwrap();
        assert_eq!(buf, [i]);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    sender.join().unwrap();
    drop(far);
    // Every message found the receiver asleep: three rings went through.
    assert_eq!(relay.join().unwrap(), 3);
}
