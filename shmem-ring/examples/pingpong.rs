//! Ping-pong latency of 64 B messages between two processes pinned to two
//! CPUs, by receive style: `cargo run -p shmem-ring --release --example pingpong`.

use std::hint::spin_loop;
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::{fork, ForkResult, Pid};
use shmem_ring::{Error, Layout, Receiver, Window};

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).unwrap();
    sched_setaffinity(Pid::from_raw(0), &set).unwrap();
}

#[derive(Clone, Copy, Debug)]
enum Style {
    Recv,
    TryRecvSpin,
    Peek,
}

fn get(rx: &mut Receiver, buf: &mut Vec<u8>, style: Style) {
    match style {
        Style::Recv => {
            rx.recv(buf, Duration::from_secs(10)).unwrap();
        }
        Style::TryRecvSpin => loop {
            match rx.try_recv(buf) {
                Ok(_) => break,
                Err(Error::Empty { .. }) => spin_loop(),
                Err(e) => panic!("{e}"),
            }
        },
        Style::Peek => {
            let s = rx.peek(Duration::from_secs(10)).unwrap();
            buf.clear();
            buf.extend_from_slice(&s);
            s.release();
        }
    }
}

const MSG: usize = 64;

fn main() {
    let n = 300_000u64;
    pin(0);
    for style in styles() {
        let w = Window::anonymous(Layout::with_capacity(2, 256 << 10).unwrap()).unwrap();
        let (a, b) = (w.attach(0).unwrap(), w.attach(1).unwrap());
        // SAFETY: single-threaded here; the child exits through _exit.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                pin(1);
                let (mut tx, mut rx) = b.channel(0).unwrap();
                let mut buf = Vec::with_capacity(64);
                for _ in 0..n {
                    get(&mut rx, &mut buf, style);
                    tx.try_send(&buf).unwrap();
                }
                // SAFETY: ends the child at once.
                unsafe { nix::libc::_exit(0) }
            }
            ForkResult::Parent { child } => {
                let (mut tx, mut rx) = a.channel(1).unwrap();
                let msg = [7u8; MSG];
                let mut buf = Vec::with_capacity(64);
                let mut best = f64::MAX;
                let mut t = Instant::now();
                for i in 0..n {
                    tx.try_send(&msg).unwrap();
                    get(&mut rx, &mut buf, style);
                    if i % 1000 == 999 {
                        let ns = t.elapsed().as_nanos() as f64 / 2000.0;
                        best = best.min(ns);
                        t = Instant::now();
                    }
                }
                nix::sys::wait::waitpid(child, None).unwrap();
                println!("{style:?}: best chunk {best:.0} ns one-way");
            }
        }
    }
}

fn styles() -> Vec<Style> {
    match std::env::args().nth(1).as_deref() {
        Some("recv") => vec![Style::Recv],
        Some("spin") => vec![Style::TryRecvSpin],
        _ => vec![Style::Recv, Style::TryRecvSpin, Style::Peek, Style::Recv],
    }
}
