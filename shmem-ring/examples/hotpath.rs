//! Software cost of one message on the hot path, without any cache-line
//! transfer: one thread sends and receives 64 B messages in turn.
//! `cargo run -p shmem-ring --release --example hotpath`

use std::time::Instant;

use shmem_ring::{Layout, Window};

fn main() -> Result<(), shmem_ring::Error> {
    let w = Window::anonymous(Layout::with_capacity(2, 256 << 10)?)?;
    let (a, b) = (w.attach(0)?, w.attach(1)?);
    let (mut tx, _) = a.channel(1)?;
    let (_, mut rx) = b.channel(0)?;
    let msg = [7u8; 64];
    let mut buf = Vec::with_capacity(64);
    for round in 0..3 {
        let n = 10_000_000u32;
        let t = Instant::now();
        for _ in 0..n {
            tx.try_send(&msg)?;
            rx.try_recv(&mut buf)?;
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(n);
        println!("round {round}: {ns:.1} ns per try_send + try_recv of 64 B");
    }
    Ok(())
}
