//! `TcpLink` over loopback: the conformance suite every link passes (both
//! ways of waiting), the handshake and how it fails, a hostile peer's
//! frames, frames cut at every byte, and two agents talking over it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mknode::agent::{kernel_info, Agent, AgentError, Diag, Hooks};
use mknode::link::tcp::{
    self, AcceptError, ConnectError, HandshakeError, TcpOptions, Wait, HELLO_LEN, MAGIC,
    MIN_MAX_MESSAGE, VERSION,
};
use mknode::link::{conformance, Link, LinkError, TcpLink};
use mknode::wire::{KernelInfo, Msg};

// ------------------------------------------------ allocations, per thread

/// The system allocator, noting the largest allocation each thread asks
/// for: a forged length must not become an allocation.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // A const-initialised Cell without destructor: no allocation here.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is passed on to `System` with the caller's arguments
// unchanged; noting the size allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `layout` (all our
        // allocations do).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds
        // `realloc`'s contract for `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ----------------------------------------------------------------- helpers

const T: Duration = Duration::from_secs(10);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Two linked endpoints 1 (listening) and 2 (connecting), through the
/// handshake.
fn pair(opts: TcpOptions) -> (TcpLink, TcpLink) {
    let l = tcp::listen(loopback(), 1, opts).expect("listen");
    let addr = l.local_addr().unwrap();
    let c = std::thread::spawn(move || tcp::connect(addr, 2, T, opts).expect("connect"));
    let (peer, a) = l.accept().expect("accept");
    let (peer_of_b, b) = c.join().unwrap();
    assert_eq!((peer, peer_of_b), (2, 1));
    (a, b)
}

/// A link (no handshake) and the raw socket at its other end, for a test
/// that writes the peer's bytes by hand.
fn raw_pair(opts: TcpOptions) -> (TcpLink, TcpStream) {
    let l = TcpListener::bind(loopback()).unwrap();
    let raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    raw.set_nodelay(true).unwrap();
    let (s, _) = l.accept().unwrap();
    (TcpLink::new(s, opts).unwrap(), raw)
}

fn frame(msg: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(msg.len()).unwrap().to_le_bytes().to_vec();
    f.extend_from_slice(msg);
    f
}

fn hello(magic: [u8; 8], version: u16, id: u16, max: u32) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[0..8].copy_from_slice(&magic);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    h[10..12].copy_from_slice(&id.to_le_bytes());
    h[12..16].copy_from_slice(&max.to_le_bytes());
    h
}

fn busy() -> TcpOptions {
    TcpOptions::default().busy_poll(tcp::DEFAULT_SPIN)
}

// ------------------------------------------------------------- conformance

fn conformance_with(opts: TcpOptions) {
    let (a, b) = pair(opts);
    assert_eq!(a.max_message(), opts.max_message);
    conformance::order_and_content(&a, &b, 20_000);
    conformance::order_and_content(&b, &a, 20_000);
    conformance::timeouts_and_limits(&a, &b);
    conformance::timeouts_and_limits(&b, &a);
    conformance::peer_gone(&a, b, || {});
}

#[test]
fn conformance_blocking() {
    conformance_with(TcpOptions::default());
}

#[test]
fn conformance_busy_poll() {
    conformance_with(busy());
}

#[test]
fn conformance_small_limit() {
    // The limit below the conformance suite's 4 KiB messages: frames of
    // every size up to it, and the largest one whole.
    conformance_with(TcpOptions::default().max_message(MIN_MAX_MESSAGE));
}

#[test]
fn busy_poll_keeps_short_timeouts() {
    let (a, _b) = pair(TcpOptions::default().busy_poll(Duration::from_millis(20)));
    let mut buf = Vec::new();
    let t0 = Instant::now();
    assert!(!a.recv(&mut buf, Duration::from_micros(200)).unwrap());
    assert!(
        t0.elapsed() < Duration::from_millis(15),
        "{:?}",
        t0.elapsed()
    );
    let t0 = Instant::now();
    assert!(!a.recv(&mut buf, Duration::ZERO).unwrap());
    assert!(
        t0.elapsed() < Duration::from_millis(15),
        "{:?}",
        t0.elapsed()
    );
}

/// Both sides send a stream while receiving the other's, each link used by
/// two threads at once: with a send lock around each whole frame and the
/// receive on its own lock, nothing interleaves and nothing deadlocks even
/// when neither stream fits the socket buffers.
#[test]
fn send_and_receive_at_once_on_both_sides() {
    for opts in [TcpOptions::default(), busy()] {
        let (a, b) = pair(opts);
        let n = 3000u64;
        let msg = |i: u64| {
            let mut m = vec![(i % 251) as u8; 8 + (i as usize * 131) % 16000];
            m[..8].copy_from_slice(&i.to_le_bytes());
            m
        };
        std::thread::scope(|s| {
            for (tx, rx) in [(&a, &b), (&b, &a)] {
                s.spawn(move || {
                    for i in 0..n {
                        tx.send(&msg(i), T).unwrap();
                    }
                });
                s.spawn(move || {
                    let mut buf = Vec::new();
                    for i in 0..n {
                        assert!(rx.recv(&mut buf, T).unwrap());
                        assert!(buf == msg(i), "message {i}");
                    }
                });
            }
        });
    }
}

/// Messages far over the receive buffer's 64 KiB arrive whole.
#[test]
fn large_messages() {
    let (a, b) = pair(TcpOptions::default());
    let max = a.max_message();
    std::thread::scope(|s| {
        s.spawn(|| {
            for len in [65_535, 65_536, 65_537, 1 << 20, max] {
                let m: Vec<u8> = (0..len).map(|i| (i % 249) as u8).collect();
                a.send(&m, T).unwrap();
            }
        });
        let mut buf = Vec::new();
        for len in [65_535, 65_536, 65_537, 1 << 20, max] {
            assert!(b.recv(&mut buf, T).unwrap());
            assert_eq!(buf.len(), len);
            assert!(buf.iter().enumerate().all(|(i, &x)| x == (i % 249) as u8));
        }
    });
}

// --------------------------------------------------------------- handshake

#[test]
fn handshake_exchanges_ids_and_settles_on_the_smaller_limit() {
    let l = tcp::listen(loopback(), 7, TcpOptions::default().max_message(1 << 16)).unwrap();
    let addr = l.local_addr().unwrap();
    let c = std::thread::spawn(move || {
        tcp::connect(addr, 3, T, TcpOptions::default().max_message(1 << 20)).unwrap()
    });
    let (peer, a) = l.accept().unwrap();
    let (peer_of_b, b) = c.join().unwrap();
    assert_eq!(peer, 3);
    assert_eq!(peer_of_b, 7);
    assert_eq!(a.max_message(), 1 << 16);
    assert_eq!(b.max_message(), 1 << 16);
    assert!(matches!(
        b.send(&vec![0; (1 << 16) + 1], T),
        Err(LinkError::TooLarge { .. })
    ));
    // Frames sent right after the hello are not lost to it.
    b.send(b"first", T).unwrap();
    let mut buf = Vec::new();
    assert!(a.recv(&mut buf, T).unwrap());
    assert_eq!(buf, b"first");
    assert_eq!(b.peer_addr(), addr);
}

/// A raw peer connects to a listener, sends `ours` (then closes when
/// `close` is set), and reads the listener's hello; returns accept's
/// error and what the raw peer read.
fn accept_from_raw(ours: &[u8], close: bool) -> (AcceptError, Vec<u8>) {
    let opts = TcpOptions {
        handshake_timeout: Duration::from_millis(300),
        ..TcpOptions::default()
    };
    let l = tcp::listen(loopback(), 1, opts).unwrap();
    let addr = l.local_addr().unwrap();
    let ours = ours.to_vec();
    let raw = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&ours).unwrap();
        if close {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut theirs = Vec::new();
        s.set_read_timeout(Some(T)).unwrap();
        let _ = s.read_to_end(&mut theirs);
        theirs
    });
    let e = l.accept().expect_err("the handshake must fail");
    drop(l);
    (e, raw.join().unwrap())
}

/// The listener's side of a raw peer's hello, which must fail with the
/// handshake error `want` describes.
fn handshake_error(e: AcceptError) -> HandshakeError {
    match e {
        AcceptError::Handshake { source, .. } => source,
        other => panic!("{other:?}"),
    }
}

#[test]
fn handshake_wrong_magic() {
    let (e, theirs) = accept_from_raw(&hello(*b"HTTP/1.1", VERSION, 2, 1 << 20), false);
    let text = mknode::error_text(&e);
    match handshake_error(e) {
        HandshakeError::BadMagic { got } => assert_eq!(&got, b"HTTP/1.1"),
        other => panic!("{other:?}"),
    }
    assert!(text.starts_with("handshake with 127.0.0.1:"), "{text}");
    assert!(text.contains("the peer is not an mknode link"), "{text}");
    // The listener sent its own hello first, then closed.
    assert_eq!(theirs, hello(MAGIC, VERSION, 1, 2 << 20));
}

#[test]
fn handshake_wrong_version() {
    let (e, _) = accept_from_raw(&hello(MAGIC, VERSION + 1, 2, 1 << 20), false);
    assert!(
        matches!(handshake_error(e), HandshakeError::Version { got, want } if got == VERSION + 1 && want == VERSION)
    );
}

#[test]
fn handshake_peer_closes_midway() {
    let (e, _) = accept_from_raw(&hello(MAGIC, VERSION, 2, 1 << 20)[..5], true);
    let e = handshake_error(e);
    assert!(matches!(e, HandshakeError::Closed { got: 5 }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "the peer closed the connection after 5 of the 16 bytes of its hello"
    );
}

#[test]
fn handshake_silent_peer_times_out() {
    let t0 = Instant::now();
    let (e, _) = accept_from_raw(&hello(MAGIC, VERSION, 2, 1 << 20)[..15], false);
    assert!(matches!(handshake_error(e), HandshakeError::Timeout(_)));
    assert!(t0.elapsed() >= Duration::from_millis(290));
}

#[test]
fn handshake_same_id_and_tiny_limit() {
    let (e, _) = accept_from_raw(&hello(MAGIC, VERSION, 1, 1 << 20), false);
    assert!(matches!(handshake_error(e), HandshakeError::SameId(1)));
    let (e, _) = accept_from_raw(&hello(MAGIC, VERSION, 2, 100), false);
    assert!(matches!(
        handshake_error(e),
        HandshakeError::Limit { max: 100 }
    ));
}

/// The connecting side checks the listener's hello the same way.
#[test]
fn connect_to_a_wrong_server() {
    let l = TcpListener::bind(loopback()).unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&hello(MAGIC, 9, 1, 1 << 20)).unwrap();
        let mut theirs = [0u8; HELLO_LEN];
        s.read_exact(&mut theirs).unwrap();
        theirs
    });
    match tcp::connect(addr, 2, T, TcpOptions::default()) {
        Err(ConnectError::Handshake {
            source: HandshakeError::Version { got: 9, want },
            ..
        }) => assert_eq!(want, VERSION),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.join().unwrap(), hello(MAGIC, VERSION, 2, 2 << 20));
    // Nobody listening: the connection error names the address.
    let e = tcp::connect(addr, 2, T, TcpOptions::default()).unwrap_err();
    assert!(matches!(e, ConnectError::Connect { .. }), "{e:?}");
    assert!(
        mknode::error_text(&e).starts_with(&format!("cannot connect to {addr}: ")),
        "{e}"
    );
}

// ----------------------------------------------------------- hostile input

#[test]
fn forged_huge_length_breaks_the_link_without_allocating() {
    for opts in [TcpOptions::default(), busy()] {
        let (link, mut raw) = raw_pair(opts.max_message(64 << 10));
        raw.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
        let mut buf = Vec::new();
        LARGEST.with(|l| l.set(0));
        let r = link.recv(&mut buf, T);
        let largest = LARGEST.with(|l| l.get());
        match r {
            Err(LinkError::Broken(why)) => {
                assert!(why.contains("4294967295"), "{why}");
                assert!(why.contains("65536"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(largest < 4096, "an allocation of {largest} bytes");
        // For good, both ways, and the peer sees the connection end.
        assert!(matches!(link.recv(&mut buf, T), Err(LinkError::Broken(_))));
        assert!(matches!(link.send(b"x", T), Err(LinkError::Broken(_))));
        raw.set_read_timeout(Some(T)).unwrap();
        assert_eq!(raw.read(&mut [0u8; 16]).unwrap(), 0);
    }
}

#[test]
fn a_frame_one_byte_over_the_limit_is_refused() {
    let (link, mut raw) = raw_pair(TcpOptions::default().max_message(MIN_MAX_MESSAGE));
    raw.write_all(&frame(&[5u8; MIN_MAX_MESSAGE])).unwrap();
    raw.write_all(&frame(&[6u8; MIN_MAX_MESSAGE + 1])).unwrap();
    let mut buf = Vec::new();
    assert!(link.recv(&mut buf, T).unwrap());
    assert_eq!(buf, [5u8; MIN_MAX_MESSAGE]);
    match link.recv(&mut buf, T) {
        Err(LinkError::Broken(why)) => assert!(why.contains("4097 bytes"), "{why}"),
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------------- cut frames

#[test]
fn a_frame_split_across_many_tiny_writes() {
    for opts in [TcpOptions::default(), busy()] {
        let (link, mut raw) = raw_pair(opts);
        let msgs: Vec<Vec<u8>> = vec![
            b"one".to_vec(),
            Vec::new(),
            (0..300).map(|i| i as u8).collect(),
        ];
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| frame(m)).collect();
        let writer = std::thread::spawn(move || {
            for b in bytes {
                raw.write_all(&[b]).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
            raw
        });
        let mut buf = Vec::new();
        for m in &msgs {
            assert!(link.recv(&mut buf, T).unwrap());
            assert_eq!(&buf, m);
        }
        drop(writer.join().unwrap());
        assert!(matches!(
            link.recv(&mut buf, T),
            Err(LinkError::PeerGone(_))
        ));
    }
}

/// A receive that times out with a frame cut at any byte (header or body)
/// keeps what arrived: the next receive delivers the frame whole, and the
/// one after it too.
#[test]
fn timeouts_mid_frame_lose_nothing() {
    for opts in [TcpOptions::default(), busy()] {
        let (link, mut raw) = raw_pair(opts);
        let msg: Vec<u8> = (0..40).collect();
        let f = frame(&msg);
        let mut buf = vec![9u8; 3];
        for cut in 0..=f.len() {
            raw.write_all(&f[..cut]).unwrap();
            let got = link.recv(&mut buf, Duration::from_millis(3)).unwrap();
            assert_eq!(got, cut == f.len(), "cut at {cut}");
            if !got {
                raw.write_all(&f[cut..]).unwrap();
                assert!(link.recv(&mut buf, T).unwrap(), "cut at {cut}");
            }
            assert_eq!(buf, msg, "cut at {cut}");
            raw.write_all(&frame(b"next")).unwrap();
            assert!(link.recv(&mut buf, T).unwrap());
            assert_eq!(buf, b"next", "after a cut at {cut}");
        }
    }
}

// ----------------------------------------------------------- the peer goes

#[test]
fn a_peer_that_closes_mid_frame_is_gone() {
    let (link, mut raw) = raw_pair(TcpOptions::default());
    raw.write_all(&frame(b"whole")).unwrap();
    raw.write_all(&frame(b"cut short")[..6]).unwrap();
    drop(raw);
    let mut buf = Vec::new();
    assert!(link.recv(&mut buf, T).unwrap());
    assert_eq!(buf, b"whole");
    match link.recv(&mut buf, T) {
        Err(LinkError::PeerGone(why)) => {
            assert!(
                why.contains("in the middle of a frame (6 of 13 bytes)"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sending_to_a_closed_peer_is_peer_gone() {
    let (a, b) = pair(TcpOptions::default());
    drop(b);
    // The first sends may still be taken by the socket; the peer's reset
    // then fails the next ones.
    let deadline = Instant::now() + T;
    loop {
        match a.send(&[0u8; 100], T) {
            Ok(()) => assert!(Instant::now() < deadline, "sends still succeed"),
            Err(LinkError::PeerGone(why)) => {
                assert!(why.contains("127.0.0.1"), "{why}");
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn shutdown_wakes_a_blocked_receive_and_ends_the_peer() {
    let (a, b) = pair(TcpOptions::default());
    std::thread::scope(|s| {
        let r = s.spawn(|| a.recv(&mut Vec::new(), T));
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        a.shutdown();
        match r.join().unwrap() {
            Err(LinkError::PeerGone(why)) => assert!(why.contains("on this side"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(1));
    });
    match b.recv(&mut Vec::new(), T) {
        Err(LinkError::PeerGone(why)) => assert!(why.ends_with("closed the connection"), "{why}"),
        other => panic!("{other:?}"),
    }
}

/// A send whose time runs out part-way through a frame (the peer reads
/// nothing) breaks the link rather than leave half a frame in the stream:
/// the peer then reads whole frames only, and sees the connection end.
#[test]
fn a_send_cut_by_its_timeout_breaks_the_link() {
    let (a, b) = pair(TcpOptions::default());
    let msg = vec![3u8; 60_000];
    let mut sent = 0u64;
    let err = loop {
        match a.send(&msg, Duration::from_millis(20)) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100_000, "the socket never filled");
    };
    match &err {
        // Nothing of the frame went out: the link is still good.
        LinkError::Timeout(_) => {
            b.send(b"still here", T).unwrap();
            let mut buf = Vec::new();
            for _ in 0..sent {
                assert!(b.recv(&mut buf, T).unwrap());
                assert!(buf == msg);
            }
            a.send(b"after", T).unwrap();
            assert!(b.recv(&mut buf, T).unwrap());
            assert_eq!(buf, b"after");
            return;
        }
        LinkError::Broken(why) => assert!(why.contains("cannot be framed"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(a.send(b"x", T), Err(LinkError::Broken(_))));
    let mut buf = Vec::new();
    for i in 0..sent {
        assert!(b.recv(&mut buf, T).unwrap(), "frame {i}");
        assert!(buf == msg, "frame {i}");
    }
    match b.recv(&mut buf, T) {
        Err(LinkError::PeerGone(why)) => assert!(why.contains("middle of a frame"), "{why}"),
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------------------------ agents

/// An agent's hooks; its kernel info names it `name`, so an answer shows
/// which agent gave it.
fn hooks(name: &'static str) -> Hooks {
    Hooks {
        power_off: Box::new(|| {}),
        info: Box::new(move || KernelInfo {
            hostname: name.into(),
            ..kernel_info()
        }),
    }
}

/// Two agents, each with the link the handshake gave it, under the id the
/// handshake told it.
fn agents(opts: TcpOptions) -> (Arc<Agent>, Arc<Agent>) {
    let a = Agent::new(0, hooks("alpha"));
    let b = Agent::new(1, hooks("beta"));
    let l = tcp::listen(loopback(), 0, opts).unwrap();
    let addr = l.local_addr().unwrap();
    let c = std::thread::spawn(move || tcp::connect(addr, 1, T, opts).unwrap());
    let (peer, la) = l.accept().unwrap();
    let (peer_of_b, lb) = c.join().unwrap();
    a.add_link(peer, Arc::new(la));
    b.add_link(peer_of_b, Arc::new(lb));
    (a, b)
}

#[test]
fn two_agents_over_tcp() {
    for opts in [TcpOptions::default(), busy()] {
        let (a, b) = agents(opts);
        let info = a
            .call_for(
                1,
                T,
                |req| Msg::InfoRequest { req },
                |m| match m {
                    Msg::Info { info, .. } => Some(info),
                    _ => None,
                },
            )
            .expect("info from the peer");
        assert_eq!(info.hostname, "beta");
        assert_eq!(info.release, kernel_info().release);
        let rtts = b.facet::<Diag>().ping(0, 20).expect("ping");
        assert_eq!(rtts.len(), 20);
        // b lets go of its link: the connection closes, and what a waits
        // on from b fails at once rather than after its timeout.
        b.remove_link(0);
        let t0 = Instant::now();
        let r = a.call(1, T, |req| Msg::InfoRequest { req });
        match r {
            Err(AgentError::Failed { message, .. }) => {
                assert!(message.contains("link lost"), "{message}")
            }
            Err(AgentError::NoLink(_) | AgentError::Link { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // The link is dropped once its receive thread saw the end.
        let deadline = Instant::now() + T;
        while a.link(1).is_ok() {
            assert!(Instant::now() < deadline, "a still holds its link to b");
            std::thread::sleep(Duration::from_millis(10));
        }
        a.shutdown();
        b.shutdown();
    }
}

#[test]
fn the_wait_mode_is_what_was_asked() {
    let (a, _b) = pair(busy());
    assert_eq!(
        a.wait(),
        Wait::BusyPoll {
            spin: tcp::DEFAULT_SPIN
        }
    );
}
