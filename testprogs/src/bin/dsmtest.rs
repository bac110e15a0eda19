//! dsmtest: the processes the DSM tests run, one per kernel, on a region
//! they map through their kernel's agent (`$MK_AGENT`, see
//! `mknode::dsm::local`). Each prints one result line and exits 0, or says
//! what went wrong and exits 1.
//!
//! ```text
//! dsmtest add NAME SIZE N          N atomic increments of the u64 at offset 0
//! dsmtest locked NAME SIZE N       N increments of a plain u64 (page 1) under a
//!                                  spinlock on page 2 (SIZE >= 12288)
//! dsmtest get NAME SIZE            prints "atomic=<page 0 u64> locked=<page 1 u64>"
//! dsmtest produce NAME SIZE N      writes N records, each acknowledged
//! dsmtest consume NAME SIZE N      checks the N records arrive in order, intact
//! dsmtest stress NAME SIZE MS SEED random reads and writes of per-page versions
//!                                  for MS ms; a version older than one already
//!                                  seen on that page is a stale read (exit 1)
//! dsmtest touch NAME SIZE PAGE     prints "mapped", waits for a line on stdin,
//!                                  then reads PAGE and prints its first u64
//! ```
//!
//! Every access goes through atomics (Acquire/Release) or volatile reads, as
//! a C program would with `_Atomic` or `volatile`.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

fn fail(msg: &str) -> ! {
    println!("FAIL {msg}");
    std::process::exit(1)
}

/// The u64 at byte `off` of the region, as an atomic.
fn word(base: *mut u8, off: usize) -> &'static AtomicU64 {
    // SAFETY: `base` is a live shared mapping of the region (it is never
    // unmapped: the process exits with it), `off` is inside it and 8-byte
    // aligned (every caller passes a multiple of 8), and every access to
    // the region goes through atomics.
    unsafe { &*base.add(off).cast::<AtomicU64>() }
}

fn word32(base: *mut u8, off: usize) -> &'static AtomicU32 {
    // SAFETY: as for `word`, with 4-byte alignment.
    unsafe { &*base.add(off).cast::<AtomicU32>() }
}

/// A small xorshift generator: deterministic per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| fail(&format!("argument {i} ({what}) missing or bad")))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cmd = args.get(1).cloned().unwrap_or_default();
    let name: String = arg(&args, 2, "NAME");
    let size: usize = arg(&args, 3, "SIZE");
    let base = match mknode::dsm::client::map(&name, size) {
        Ok(p) => p,
        Err(e) => fail(&format!(
            "mapping {name}: {} (errno {})",
            mknode::error_text(&e),
            e.errno()
        )),
    };
    let t0 = Instant::now();
    match cmd.as_str() {
        "add" => {
            let n: u64 = arg(&args, 4, "N");
            let w = word(base, 0);
            for _ in 0..n {
                w.fetch_add(1, Ordering::AcqRel);
            }
            println!("done add {n} in {} ms", t0.elapsed().as_millis());
        }
        "locked" => {
            let n: u64 = arg(&args, 4, "N");
            let lock = word32(base, 2 * PAGE);
            let counter = word(base, PAGE);
            for _ in 0..n {
                while lock
                    .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_err()
                {
                    std::hint::spin_loop();
                }
                // A plain read-modify-write: exact only if the lock works.
                let v = counter.load(Ordering::Relaxed);
                counter.store(v + 1, Ordering::Relaxed);
                lock.store(0, Ordering::Release);
            }
            println!("done locked {n} in {} ms", t0.elapsed().as_millis());
        }
        "get" => {
            println!(
                "atomic={} locked={}",
                word(base, 0).load(Ordering::Acquire),
                word(base, PAGE).load(Ordering::Acquire)
            );
        }
        "produce" | "consume" => {
            // Page 0: the sequence number published; page 1: the record;
            // page 2: the consumer's acknowledgement.
            let n: u64 = arg(&args, 4, "N");
            let (seq, ack) = (word(base, 0), word(base, 2 * PAGE));
            let deadline = t0 + Duration::from_secs(120);
            // Waits yield the CPU: in the tests three kernels' agents and
            // both processes share 2 CPUs, and a waiter that never yields
            // would measure the scheduler's time slice, not the DSM.
            for i in 1..=n {
                if cmd == "produce" {
                    for k in 0..8 {
                        word(base, PAGE + 8 * k).store(i * 1000 + k as u64, Ordering::Relaxed);
                    }
                    seq.store(i, Ordering::Release);
                    while ack.load(Ordering::Acquire) != i {
                        std::thread::yield_now();
                        if Instant::now() > deadline {
                            fail(&format!("no ack of record {i}"));
                        }
                    }
                } else {
                    let got = loop {
                        let s = seq.load(Ordering::Acquire);
                        if s != i - 1 {
                            break s;
                        }
                        std::thread::yield_now();
                        if Instant::now() > deadline {
                            fail(&format!("record {i} never came"));
                        }
                    };
                    if got != i {
                        fail(&format!("record {got} came when {i} was due"));
                    }
                    for k in 0..8 {
                        let v = word(base, PAGE + 8 * k).load(Ordering::Relaxed);
                        if v != i * 1000 + k as u64 {
                            fail(&format!("record {i} word {k} is {v}"));
                        }
                    }
                    ack.store(i, Ordering::Release);
                }
            }
            println!("done {cmd} {n} in {} ms", t0.elapsed().as_millis());
        }
        "stress" => {
            let ms: u64 = arg(&args, 4, "MS");
            let mut rng = Rng(arg::<u64>(&args, 5, "SEED") | 1);
            let pages = size / PAGE;
            let mut seen = vec![0u64; pages];
            let (mut reads, mut writes) = (0u64, 0u64);
            while t0.elapsed() < Duration::from_millis(ms) {
                let p = usize::try_from(rng.next() % pages as u64).unwrap_or(0);
                let w = word(base, p * PAGE);
                let v = if rng.next().is_multiple_of(4) {
                    writes += 1;
                    w.fetch_add(1, Ordering::AcqRel) + 1
                } else {
                    reads += 1;
                    w.load(Ordering::Acquire)
                };
                if v < seen[p] {
                    fail(&format!("stale read: page {p} gave {v} after {}", seen[p]));
                }
                seen[p] = v;
            }
            println!("done stress reads={reads} writes={writes}");
        }
        "touch" => {
            let page: usize = arg(&args, 4, "PAGE");
            println!("mapped");
            let _ = std::io::stdout().flush();
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            println!("value={}", word(base, page * PAGE).load(Ordering::Acquire));
        }
        other => fail(&format!("unknown command {other:?}")),
    }
}
