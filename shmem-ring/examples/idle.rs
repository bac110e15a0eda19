//! What an idle blocking receive costs: a receiver waits on an empty ring in
//! a loop of `recv` calls with a 100 ms timeout (as mknode's agents do) for
//! 5 s, and this prints the CPU time it used and its voluntary context
//! switches (one per sleep) over the first second and over the rest, and
//! the delay of one message sent after the idle period.
//! `cargo run -p shmem-ring --release --example idle`

use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, Usage, UsageWho};
use shmem_ring::{Error, Layout, Window};

fn usage() -> Usage {
    getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage")
}

/// CPU share and wake-ups per second between two samples `secs` apart.
fn span(a: &Usage, b: &Usage, secs: f64) -> String {
    let cpu = |u: &Usage| {
        let t = |v: nix::sys::time::TimeVal| {
            Duration::from_secs(v.tv_sec() as u64) + Duration::from_micros(v.tv_usec() as u64)
        };
        t(u.user_time()) + t(u.system_time())
    };
    format!(
        "{:.2}% of a core, {:.0} wake-ups/s",
        (cpu(b) - cpu(a)).as_secs_f64() / secs * 100.0,
        (b.voluntary_context_switches() - a.voluntary_context_switches()) as f64 / secs
    )
}

fn main() -> Result<(), Error> {
    let w = Window::anonymous(Layout::with_capacity(2, 64 << 10)?)?;
    let (a, b) = (w.attach(0)?, w.attach(1)?);
    let beat = a.heartbeat_handle();
    let (mut tx, _) = a.channel(1)?;
    let (_, mut rx) = b.channel(0)?;
    let idle = Duration::from_secs(5);
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
    let start = Instant::now();
    let first = usage();
    let mut mid = None;
    let mut buf = Vec::new();
    let got = loop {
        match rx.recv(&mut buf, Duration::from_millis(100)) {
            Ok(_) => break Instant::now(),
            Err(Error::Timeout { .. }) => {
                if mid.is_none() && start.elapsed() >= Duration::from_secs(1) {
                    mid = Some((start.elapsed(), usage()));
                }
            }
            Err(e) => return Err(e),
        }
    };
    let last = usage();
    let sent = sender.join().expect("sender thread")?;
    let (mid_at, mid) = mid.expect("a second passed");
    let rest = got.duration_since(start) - mid_at;
    println!(
        "first {:.1} s idle: {}; next {:.1} s: {}; a message after {:.0} s idle arrived {:.2} ms late",
        mid_at.as_secs_f64(),
        span(&first, &mid, mid_at.as_secs_f64()),
        rest.as_secs_f64(),
        span(&mid, &last, rest.as_secs_f64()),
        idle.as_secs_f64(),
        got.duration_since(sent).as_secs_f64() * 1e3
    );
    Ok(())
}
