//! The public API in one process: formatting and attaching, the header checks,
//! one sender and one receiver per ring, batching, zero copy, size limits,
//! liveness and blocking errors.

use std::time::{Duration, Instant};

use shmem_ring::{Error, Layout, Liveness, PeerState, Window, LAYOUT_VERSION, MAGIC};

mod common;

fn window(endpoints: u16, capacity: u64) -> Window {
    Window::anonymous(Layout::with_capacity(endpoints, capacity).unwrap()).unwrap()
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn create_then_open_sees_the_same_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("win");
    let w = Window::create(&path, 1 << 20, 3).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), w.layout().size());
    let again = Window::open(&path).unwrap();
    assert_eq!(again.layout(), w.layout());
    assert_eq!(again.format_id(), w.format_id());

    // A message written through one mapping is read through the other.
    let a = w.attach(0).unwrap();
    let b = again.attach(2).unwrap();
    let (mut tx, _) = a.channel(2).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();
    tx.try_send(b"across mappings").unwrap();
    let mut buf = Vec::new();
    rx.recv(&mut buf, Duration::from_secs(1)).unwrap();
    assert_eq!(buf, b"across mappings");
}

#[test]
fn format_at_and_open_at_use_an_offset_inside_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bar");
    let file_len = 3 << 20;
    std::fs::File::create(&path)
        .unwrap()
        .set_len(file_len)
        .unwrap();
    let offset = 1 << 20;
    let layout = Layout::for_size(1 << 20, 2).unwrap();
    let w = Window::format_at(&path, offset, 1 << 20, layout).unwrap();
    // The file keeps its size: the daemon sized it for QEMU.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), file_len);
    let seen = Window::open_at(&path, offset, 1 << 20).unwrap();
    assert_eq!(seen.layout(), w.layout());
    // The file's start is not a window.
    assert!(matches!(
        Window::open(&path),
        Err(Error::BadMagic { found: 0, .. })
    ));
}

#[test]
fn opening_a_bad_window_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("win");
    let w = Window::create(&path, 1 << 20, 2).unwrap();

    w.poke(0, b"NOTARING").unwrap();
    let e = Window::open(&path).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadMagic {
                expected: MAGIC,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("0x474e495241544f4e"), "{e}");
    w.poke(0, &MAGIC.to_le_bytes()).unwrap();

    w.poke(8, &7u32.to_le_bytes()).unwrap();
    let e = Window::open(&path).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadVersion {
                found: 7,
                supported: LAYOUT_VERSION
            }
        ),
        "{e}"
    );
    w.poke(8, &LAYOUT_VERSION.to_le_bytes()).unwrap();

    // Endpoint count no layout can have.
    w.poke(12, &0u16.to_le_bytes()).unwrap();
    let e = Window::open(&path).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadHeader {
                field: "endpoints",
                found: 0,
                ..
            }
        ),
        "{e}"
    );
    w.poke(12, &2u16.to_le_bytes()).unwrap();

    // A size that disagrees with the endpoint count and capacity.
    w.poke(0x10, &(1u64 << 40).to_le_bytes()).unwrap();
    let e = Window::open(&path).unwrap_err();
    assert!(
        matches!(e, Error::HeaderMismatch { field: "size", .. }),
        "{e}"
    );
    w.poke(0x10, &w.layout().size().to_le_bytes()).unwrap();

    Window::open(&path).unwrap();

    // A file shorter than the layout in its header.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(w.layout().size() - 4096)
        .unwrap();
    let e = Window::open(&path).unwrap_err();
    assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");

    let e = Window::open(dir.path().join("missing")).unwrap_err();
    assert!(matches!(e, Error::Io { op: "open", .. }), "{e}");
}

#[test]
fn attach_bumps_the_generation_and_a_new_attach_supersedes_the_old() {
    let w = window(3, 4096);
    let first = w.attach(1).unwrap();
    let g1 = first.generation();
    let observer = w.attach(0).unwrap();
    assert_eq!(observer.peer(1).unwrap().generation, g1);
    assert_eq!(observer.peer(2).unwrap().state, PeerState::Absent);

    // Attaching the same id again (a restart) takes it over.
    let second = w.attach(1).unwrap();
    assert!(second.generation() > g1);
    assert_eq!(observer.peer(1).unwrap().generation, second.generation());
    assert!(matches!(
        first.heartbeat(),
        Err(Error::Superseded { id: 1, .. })
    ));
    assert!(matches!(first.channel(0), Err(Error::Superseded { .. })));
    second.heartbeat().unwrap();

    // Dropping the superseded handle must not detach the new one.
    drop(first);
    assert_eq!(observer.peer(1).unwrap().state, PeerState::Alive);
    drop(second);
    assert_eq!(observer.peer(1).unwrap().state, PeerState::Gone);

    assert!(matches!(
        w.attach(3),
        Err(Error::NoSuchEndpoint {
            id: 3,
            endpoints: 3
        })
    ));
}

#[test]
fn one_sender_and_one_receiver_per_ring() {
    let w = window(2, 4096);
    let a = w.attach(0).unwrap();
    let halves = a.channel(1).unwrap();
    assert!(matches!(
        a.channel(1),
        Err(Error::AlreadyClaimed {
            role: "sender",
            from: 0,
            to: 1
        })
    ));
    assert!(matches!(a.channel(0), Err(Error::SelfChannel { id: 0 })));
    assert!(matches!(a.channel(9), Err(Error::NoSuchEndpoint { .. })));
    drop(halves);
    let (_tx, _rx) = a.channel(1).unwrap();
}

#[test]
fn messages_keep_order_and_boundaries_across_wraps() {
    let w = window(2, 4096);
    let (a, b) = (w.attach(0).unwrap(), w.attach(1).unwrap());
    let (mut tx, _) = a.channel(1).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();
    let mut msg = Vec::new();
    let mut buf = Vec::new();
    let mut sent = 0u64;
    let mut received = 0u64;
    // ~60 laps of a 4 KiB ring with sizes that force padding at the end.
    while received < 3000 {
        let len = common::message_len(sent, 300);
        common::make_message(sent, len, &mut msg);
        match tx.try_send(&msg) {
            Ok(()) => sent += 1,
            Err(Error::Full { from: 0, to: 1 }) => loop {
                match rx.try_recv(&mut buf) {
                    Ok(_) => {
                        assert_eq!(common::check_message(&buf), Ok(received));
                        received += 1;
                    }
                    Err(Error::Empty { .. }) => break,
                    Err(e) => panic!("{e}"),
                }
            },
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn the_largest_message_fits_and_a_larger_one_is_refused_whole() {
    let w = window(2, 4096);
    let (a, b) = (w.attach(0).unwrap(), w.attach(1).unwrap());
    let (mut tx, _) = a.channel(1).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();
    let max = w.layout().max_message();
    assert_eq!(max, 4096 - 8);
    assert_eq!(tx.max_message(), max);
    let e = tx.try_send(&vec![1; max + 1]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                len: 4089,
                max: 4088
            }
        ),
        "{e}"
    );
    assert!(matches!(
        tx.try_reserve(max + 1),
        Err(Error::TooLarge { .. })
    ));

    // Move the positions off 0 so the big frame must pad and wrap.
    tx.try_send(&[9; 100]).unwrap();
    let mut buf = Vec::new();
    rx.try_recv(&mut buf).unwrap();
    let big: Vec<u8> = (0..max).map(|i| i as u8).collect();
    // Only the padding fits until the receiver passes it.
    assert!(matches!(tx.try_send(&big), Err(Error::Full { .. })));
    assert!(matches!(rx.try_recv(&mut buf), Err(Error::Empty { .. })));
    tx.try_send(&big).unwrap();
    assert_eq!(rx.try_recv(&mut buf).unwrap(), max);
    assert_eq!(buf, big);
    // An empty message is a message.
    tx.try_send(&[]).unwrap();
    assert_eq!(rx.try_recv(&mut buf).unwrap(), 0);
    assert!(matches!(rx.try_recv(&mut buf), Err(Error::Empty { .. })));
}

#[test]
fn batched_frames_are_invisible_until_flushed() {
    let w = window(2, 4096);
    let (a, b) = (w.attach(0).unwrap(), w.attach(1).unwrap());
    let (mut tx, _) = a.channel(1).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();
    let mut buf = Vec::new();
    for i in 0..5u8 {
        tx.try_send_batched(&[i; 10]).unwrap();
    }
    assert!(tx.has_unflushed());
    assert!(matches!(rx.try_recv(&mut buf), Err(Error::Empty { .. })));
    tx.flush();
    assert!(!tx.has_unflushed());
    for i in 0..5u8 {
        rx.try_recv(&mut buf).unwrap();
        assert_eq!(buf, [i; 10]);
    }

    // Filling the ring with batched frames publishes them before `Full`, so
    // the receiver can drain without a flush.
    let mut n = 0;
    while tx.try_send_batched(&[7; 64]).is_ok() {
        n += 1;
    }
    assert!(n > 40);
    for _ in 0..n {
        rx.try_recv(&mut buf).unwrap();
    }

    // Dropping the sender flushes it.
    tx.try_send_batched(b"last").unwrap();
    drop(tx);
    rx.try_recv(&mut buf).unwrap();
    assert_eq!(buf, b"last");
}

#[test]
fn zero_copy_slots() {
    let w = window(2, 16384);
    let (a, b) = (w.attach(0).unwrap(), w.attach(1).unwrap());
    let (mut tx, _) = a.channel(1).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();

    let mut slot = tx.try_reserve(4096).unwrap();
    assert_eq!(slot.len(), 4096);
    for (i, x) in slot.iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    slot.commit();

    // An abandoned slot leaves nothing behind.
    {
        let mut slot = tx.try_reserve(100).unwrap();
        slot.fill(0xee);
    }

    let mut slot = tx.try_reserve(3).unwrap();
    slot.copy_from_slice(b"abc");
    slot.commit_batched();
    assert!(tx.has_unflushed());

    {
        let page = rx.try_peek().unwrap();
        assert_eq!(page.len(), 4096);
        assert!(page.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
    }
    // Not released: the same message again.
    let page = rx.try_peek().unwrap();
    assert_eq!(page.len(), 4096);
    page.release();
    assert!(matches!(rx.try_peek(), Err(Error::Empty { .. })));
    tx.flush();
    let slot = rx.try_peek().unwrap();
    assert_eq!(&*slot, b"abc");
    slot.release();
}

#[test]
fn a_blocking_recv_times_out_when_the_peer_is_alive() {
    let w = window(2, 4096);
    let (a, b) = (w.attach(0).unwrap(), w.attach(1).unwrap());
    let (_tx, _) = a.channel(1).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();
    let t = Instant::now();
    let e = rx.recv(&mut Vec::new(), 20 * MS).unwrap_err();
    assert!(matches!(e, Error::Timeout { from: 0, to: 1, .. }), "{e}");
    assert!(t.elapsed() >= 20 * MS);
    assert!(t.elapsed() < 500 * MS, "{:?}", t.elapsed());
}

#[test]
fn liveness_moves_from_alive_to_silent_to_dead_and_blocking_calls_say_so() {
    let w = window(2, 4096);
    let quick = Liveness {
        silent_after: 30 * MS,
        dead_after: 120 * MS,
    };
    let a = w.attach(0).unwrap();
    let b = w.attach_with(1, quick).unwrap();
    assert_eq!(b.peer(0).unwrap().state, PeerState::Alive);
    std::thread::sleep(50 * MS);
    assert_eq!(b.peer(0).unwrap().state, PeerState::Silent);
    a.heartbeat().unwrap();
    assert_eq!(b.peer(0).unwrap().state, PeerState::Alive);
    std::thread::sleep(150 * MS);
    let s = b.peer(0).unwrap();
    assert_eq!(s.state, PeerState::Dead);
    assert!(s.quiet >= 120 * MS);

    // A receiver waiting on a dead sender gets PeerDead, not a timeout...
    let (_atx, _arx) = a.channel(1).unwrap();
    let (mut btx, mut brx) = b.channel(0).unwrap();
    let t = Instant::now();
    let e = brx
        .recv(&mut Vec::new(), Duration::from_secs(10))
        .unwrap_err();
    assert!(matches!(e, Error::PeerDead { peer: 0, .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // ... but a message already in the ring is delivered first.
    b.heartbeat().unwrap();
    drop((_atx, _arx));
    let (mut atx, _arx) = a.channel(1).unwrap();
    atx.try_send(b"before dying").unwrap();
    let mut buf = Vec::new();
    brx.recv(&mut buf, Duration::from_secs(10)).unwrap();
    assert_eq!(buf, b"before dying");

    // A sender blocked on a full ring whose reader detached gets PeerGone.
    while btx.try_send(&[0; 512]).is_ok() {}
    drop(_arx);
    drop(atx);
    drop(a);
    let e = btx.send(&[0; 512], Duration::from_secs(10)).unwrap_err();
    assert!(matches!(e, Error::PeerGone { peer: 0 }), "{e}");
}

#[test]
fn a_heartbeat_thread_keeps_a_peer_alive() {
    let w = window(2, 4096);
    let quick = Liveness {
        silent_after: 40 * MS,
        dead_after: 200 * MS,
    };
    let a = w.attach(0).unwrap();
    let b = w.attach_with(1, quick).unwrap();
    let beat = a.heartbeat_handle();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            beat.beat().unwrap();
            std::thread::sleep(5 * MS);
        }
    });
    for _ in 0..10 {
        std::thread::sleep(25 * MS);
        assert_eq!(b.peer(0).unwrap().state, PeerState::Alive);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn reset_is_refused_while_the_peer_lives_and_empties_the_channel_after() {
    let w = window(2, 4096);
    let (a, b) = (w.attach(0).unwrap(), w.attach(1).unwrap());
    {
        let (mut tx, _) = a.channel(1).unwrap();
        tx.try_send(b"stale").unwrap();
    }
    let e = a.reset_channel(1).unwrap_err();
    assert!(
        matches!(
            e,
            Error::PeerAlive {
                peer: 1,
                state: PeerState::Alive
            }
        ),
        "{e}"
    );
    drop(b);
    {
        let _held = a.channel(1).unwrap();
        assert!(matches!(
            a.reset_channel(1),
            Err(Error::AlreadyClaimed { .. })
        ));
    }
    assert_eq!(a.reset_channel(1).unwrap().state, PeerState::Gone);
    let b = w.attach(1).unwrap();
    let (_, mut rx) = b.channel(0).unwrap();
    assert!(matches!(
        rx.try_recv(&mut Vec::new()),
        Err(Error::Empty { .. })
    ));
}

#[test]
fn halves_are_send_and_errors_are_send_sync() {
    fn is_send<T: Send>() {}
    fn is_sync<T: Send + Sync>() {}
    is_send::<shmem_ring::Sender>();
    is_send::<shmem_ring::Receiver>();
    is_sync::<shmem_ring::Endpoint>();
    is_sync::<shmem_ring::Window>();
    is_sync::<shmem_ring::Heartbeat>();
    is_sync::<Error>();
}
