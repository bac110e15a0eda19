//! What an idle blocking receive costs: a receiver waits on an empty ring in
//! a loop of `recv` calls with a 100 ms timeout (as mknode's agents do) for
//! 3 s, and this prints the CPU time it used, its voluntary context
//! switches (one per sleep) and the delay of one message sent after the
//! idle period.
//! `cargo run -p shmem-ring --release --example idle`

use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use shmem_ring::{Error, Layout, Window};

fn main() -> Result<(), Error> {
    let w = Window::anonymous(Layout::with_capacity(2, 64 << 10)?)?;
    let (a, b) = (w.attach(0)?, w.attach(1)?);
    let beat = a.heartbeat_handle();
    let (mut tx, _) = a.channel(1)?;
    let (_, mut rx) = b.channel(0)?;
    let idle = Duration::from_secs(3);
    let sender = std::thread::spawn(move || {
        // Keep endpoint 0 alive while the receiver idles, then send once.
        let start = Instant::now();
        while start.elapsed() < idle {
            let _ = beat.beat();
            std::thread::sleep(Duration::from_millis(50));
        }
        let sent = Instant::now();
        tx.try_send(b"wake up").map(|()| sent)
    });
    let before = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
    let mut buf = Vec::new();
    let got = loop {
        match rx.recv(&mut buf, Duration::from_millis(100)) {
            Ok(_) => break Instant::now(),
            Err(Error::Timeout { .. }) => continue,
            Err(e) => return Err(e),
        }
    };
    let after = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
    let sent = sender.join().expect("sender thread")?;
    let cpu = |u: &nix::sys::resource::Usage| {
        let us = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
        };
        us(u.user_time()) + us(u.system_time())
    };
    let used = cpu(&after) - cpu(&before);
    println!(
        "idle {:.1} s: cpu {:.1} ms ({:.2}% of a core), {} sleeps; a message after it arrived {:.2} ms late",
        idle.as_secs_f64(),
        used.as_secs_f64() * 1e3,
        used.as_secs_f64() / idle.as_secs_f64() * 100.0,
        after.voluntary_context_switches() - before.voluntary_context_switches(),
        got.duration_since(sent).as_secs_f64() * 1e3
    );
    Ok(())
}
