//! Boot time and latency of the QEMU backend, against bare QEMU measured in
//! the same run.
//!
//! - `mkctl boot` of a one-instance topology (1 vCPU, 256M), from the
//!   command's start to "ready" (the guest's agent answered over the
//!   window), versus a bare `qemu-system-x86_64 -kernel <same kernel>
//!   -initrd <busybox init that powers off at once>` on the same machine
//!   options, from spawn to exit. Target: ≤ 1.3×.
//! - Round-trip latency host↔guest and guest↔guest over the window
//!   (`mkctl ping`), on the demo topology.
//!
//! Run: `cargo build -p mkctl && cargo bench -p mkctl-e2e --bench boot`
//! (needs qemu/setup.sh; the mkctl binary is taken from target/debug).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use mkctl::initramfs::Initramfs;
use mkctl::qemu::MachineSpec;
use mkctl::units::{ByteSize, MIB};
use mkctl_e2e::{repo_root, run_qemu, Artifacts, Scratch};

const ROUNDS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mkctl_bin() -> PathBuf {
    let root = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    let bin = root.join("debug/mkctl");
    assert!(
        bin.is_file(),
        "{} is missing: cargo build -p mkctl first",
        bin.display()
    );
    bin
}

fn main() {
    let art = Artifacts::require();
    let scratch = Scratch::new("bench-boot");
    let busybox = PathBuf::from("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox missing: run qemu/setup.sh (busybox-static)"
    );

    // Bare QEMU: the same kernel and machine options; /init powers off.
    let mut ir = Initramfs::base();
    ir.host_file("/bin/busybox", &busybox, Some(0o755)).unwrap();
    ir.file(
        "/init",
        b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n",
        0o755,
    )
    .unwrap();
    let initrd = scratch.join("bare.cpio");
    ir.write_file(&initrd).unwrap();
    let mut bare = Vec::new();
    for r in 0..ROUNDS {
        let mut spec = MachineSpec::new(
            "bare",
            &art.kernel,
            &initrd,
            "console=ttyS0 panic=-1",
            &scratch.join(&format!("bare{r}.log")),
        );
        spec.qemu = art.qemu.clone();
        spec.memory = ByteSize(256 * MIB);
        let out = run_qemu(&spec, Duration::from_secs(120));
        assert!(
            out.status.is_some_and(|s| s.success()),
            "bare boot failed\n{}",
            out.report()
        );
        bare.push(out.elapsed);
    }

    // mkctl boot to ready, then stop (not timed).
    let bin = mkctl_bin();
    let run_dir = scratch.join("run");
    let mk = |args: &[&str]| {
        let out = Command::new(&bin)
            .args(args)
            .env("MKCTL_RUN_DIR", &run_dir)
            .output()
            .expect("run mkctl");
        assert!(
            out.status.success(),
            "mkctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let single = repo_root()
        .join("tests/configs/single.toml")
        .display()
        .to_string();
    let mut ours = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        mk(&["boot", &single]);
        ours.push(t.elapsed());
        mk(&["stop", "--all"]);
    }
    mk(&["daemon", "stop"]);

    // Latency on the demo topology.
    let demo = repo_root().join("configs/demo.toml").display().to_string();
    mk(&["boot", &demo]);
    let ping = |a: &str, b: &str| {
        let out = mk(&["ping", a, b, "--count", "2000", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["rtt_min_ns"].as_u64().unwrap(),
            v["rtt_median_ns"].as_u64().unwrap(),
        )
    };
    let host_guest = ping("host", "alpha");
    let guest_guest = ping("alpha", "beta");
    mk(&["daemon", "stop"]);

    let (b, o) = (median(bare), median(ours));
    let ratio = o.as_secs_f64() / b.as_secs_f64();
    println!("QEMU backend boot, 1 vCPU / 256M under TCG, median of {ROUNDS}");
    println!(
        "  bare qemu -kernel -initrd (busybox poweroff)   {:>8.2} s",
        b.as_secs_f64()
    );
    println!(
        "  mkctl boot, to agent ready over the window     {:>8.2} s   {ratio:.2}x bare",
        o.as_secs_f64()
    );
    println!(
        "  target <= 1.3x: {}",
        if ratio <= 1.3 { "PASS" } else { "MISS" }
    );
    println!("round trips over the window (demo topology, 2000 each)");
    println!(
        "  host  <-> alpha   min {:>8.1} µs   median {:>8.1} µs",
        host_guest.0 as f64 / 1e3,
        host_guest.1 as f64 / 1e3
    );
    println!(
        "  alpha <-> beta    min {:>8.1} µs   median {:>8.1} µs",
        guest_guest.0 as f64 / 1e3,
        guest_guest.1 as f64 / 1e3
    );
}
