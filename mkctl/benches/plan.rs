//! How fast `mkctl plan` answers on the large example (64 CPUs, 4 nodes,
//! 5 instances). Target: well under 100 ms for the whole command.
//!
//! Printed next to alternatives measured in the same run: parsing the same
//! TOML text alone (the floor of any topology tool), and spawning a process
//! that does nothing (`/bin/true`, the floor of any command).
//!
//! Run: `cargo bench -p mkctl --bench plan`

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<F: FnMut()>(n: usize, mut f: F) -> Duration {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    median(v)
}

fn main() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/large.toml"
    ));
    let text = std::fs::read_to_string(path).unwrap();

    let floor_parse = time(2000, || {
        let doc = toml::de::DeTable::parse(&text).unwrap();
        std::hint::black_box(doc);
    });
    let in_process = time(2000, || {
        let t = mkctl::topology::load(path, || None).unwrap();
        let report = mkctl::plan::Plan::new(&t).render();
        std::hint::black_box(report);
    });
    let bin = env!("CARGO_BIN_EXE_mkctl");
    let command = time(50, || {
        let out = Command::new(bin).arg("plan").arg(path).output().unwrap();
        assert!(out.status.success());
    });
    let spawn_floor = time(50, || {
        Command::new("/bin/true").status().unwrap();
    });

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("mkctl plan on configs/large.toml (medians)");
    println!(
        "  {:<44} {:>10.1} µs",
        "TOML parse only (floor)",
        us(floor_parse)
    );
    println!(
        "  {:<44} {:>10.1} µs  {:>6.1}x the parse",
        "load + validate + place + plan + render",
        us(in_process),
        us(in_process) / us(floor_parse)
    );
    println!(
        "  {:<44} {:>10.1} µs",
        "spawn /bin/true (floor)",
        us(spawn_floor)
    );
    println!(
        "  {:<44} {:>10.1} µs  {:>6.1}x the spawn",
        "`mkctl plan` as a command",
        us(command),
        us(command) / us(spawn_floor)
    );
    let ok = command < Duration::from_millis(100);
    println!(
        "  target: command well under 100 ms: {} ({:.2} ms)",
        if ok { "PASS" } else { "MISS" },
        us(command) / 1000.0
    );
}
