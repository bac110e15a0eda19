//! The QEMU NUMA runs: boot the default demo topology (configs/demo.toml)
//! with `mkctl boot` under TCG and check, from inside each guest through
//! `mkctl exec`, what the guests see; then traffic between every pair of
//! kernels, exec's byte-exactness, stop, and failure detection. A second
//! topology gives one guest two NUMA nodes.
//!
//! These tests boot real kernels: they need `qemu/setup.sh` (the README's
//! test command runs it) and fail — never skip — without it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use mkctl_e2e::{booted, repo_root, Artifacts, Mkctl};

/// Boots are heavy on 2 cores: one topology at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn demo() -> String {
    repo_root().join("configs/demo.toml").display().to_string()
}

fn sh(m: &Mkctl, instance: &str, script: &str) -> String {
    m.run(&["exec", instance, "--", "sh", "-c", script])
        .ok()
        .text()
}

fn status(m: &Mkctl) -> serde_json::Value {
    m.run(&["status", "--json"]).ok().json()
}

fn instance<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["daemon"]["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {st}"))
}

fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut c = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn demo_topology_end_to_end() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let art = Artifacts::require();
    let m = Mkctl::new("demo");
    let t0 = Instant::now();
    let boot = m.run(&["boot", &demo()]).ok();
    eprintln!(
        "boot took {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        boot.stderr
    );
    assert!(boot.text().contains("alpha, beta ready"), "{}", boot.text());
    // Booting it again changes nothing and is not an error.
    let again = m.run(&["boot", &demo()]).ok();
    assert!(
        again.text().contains("alpha, beta already ready"),
        "{}",
        again.text()
    );

    // What each guest sees matches the topology: the stock kernel, its
    // CPUs, one NUMA node (each instance sits on one node), its memory.
    for (name, cpus) in [("alpha", "0"), ("beta", "0-1")] {
        assert_eq!(
            sh(&m, name, "uname -r").trim(),
            art.kernel_release,
            "{name}"
        );
        assert_eq!(sh(&m, name, "hostname").trim(), name);
        assert_eq!(
            sh(&m, name, "cat /sys/devices/system/cpu/online").trim(),
            cpus,
            "{name}"
        );
        assert_eq!(
            sh(&m, name, "ls /sys/devices/system/node | grep node").trim(),
            "node0",
            "{name}"
        );
        let kb: u64 = sh(&m, name, "grep MemTotal /proc/meminfo")
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("MemTotal");
        // 256M given; the kernel keeps some for itself.
        assert!(
            (150 * 1024..=256 * 1024).contains(&kb),
            "{name}: MemTotal {kb} kB"
        );
        let info = m.run(&["info", name, "--json"]).ok().json();
        assert_eq!(info["cpus_online"], cpus);
    }

    // Messages in every direction arrive in order and intact.
    for (from, to) in [
        ("host", "alpha"),
        ("alpha", "host"),
        ("host", "beta"),
        ("alpha", "beta"),
        ("beta", "alpha"),
    ] {
        let r = m
            .run(&[
                "traffic", from, to, "--count", "3000", "--size", "512", "--json",
            ])
            .ok()
            .json();
        assert_eq!(
            (r["sent"].as_u64(), r["good"].as_u64(), r["bad"].as_u64()),
            (Some(3000), Some(3000), Some(0)),
            "{from} -> {to}: {r}"
        );
    }
    // Guest to guest round trips, measured by the guests' agents.
    let p = m
        .run(&["ping", "alpha", "beta", "--count", "50", "--json"])
        .ok()
        .json();
    assert_eq!(p["count"], 50);
    assert!(p["rtt_median_ns"].as_u64().unwrap() > 0);

    // exec: exit status, stdout and stderr apart, binary stdin round trip.
    let r = m.run(&[
        "exec",
        "beta",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(r.code, 7);
    assert_eq!(r.stdout, b"out\n");
    assert!(r.stderr.contains("err\n"), "{}", r.stderr);
    // A command that does not exist: 127 and why, as a shell says it.
    let r = m.run(&["exec", "beta", "--", "/no/such/prog"]);
    assert_eq!(r.code, 127, "{r:?}");
    assert!(
        r.stderr
            .contains("cannot run /no/such/prog: No such file or directory"),
        "{}",
        r.stderr
    );
    let binary: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let r = m
        .run_with_input(&["exec", "alpha", "--", "cat"], &binary)
        .ok();
    assert!(
        r.stdout == binary,
        "binary round trip differs ({} bytes back)",
        r.stdout.len()
    );
    // 10 MB of output, byte-exact: the guest hashes what it sends.
    let r = m
        .run(&[
            "exec",
            "alpha",
            "--",
            "sh",
            "-c",
            "head -c 10485760 /dev/urandom > /tmp/r; sha256sum /tmp/r >&2; cat /tmp/r; rm /tmp/r",
        ])
        .ok();
    assert_eq!(r.stdout.len(), 10 << 20);
    let guest_hash = r
        .stderr
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(sha256(&r.stdout), guest_hash);

    // Stopping one instance leaves the other running.
    m.run(&["stop", "beta"]).ok();
    let st = status(&m);
    assert_eq!(instance(&st, "beta")["state"], "stopped");
    assert_eq!(instance(&st, "alpha")["state"], "ready");
    assert_eq!(sh(&m, "alpha", "echo still here").trim(), "still here");

    // A QEMU that dies shows as failed within a few seconds.
    let pid = instance(&st, "alpha")["pid"].as_u64().expect("alpha's pid");
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    loop {
        let st = status(&m);
        let a = instance(&st, "alpha");
        if a["state"] == "failed" {
            assert!(a["reason"].as_str().unwrap().contains("qemu exited"), "{a}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "alpha not failed after 5 s: {a}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(m.run(&["exec", "alpha", "--", "true"]).code, 0);

    // A failed instance boots again; so does one whose QEMU was killed a
    // moment ago, before the daemon's monitor looked (the boot looks at
    // the QEMU first instead of calling it "already ready").
    for round in 0..2 {
        if round == 1 {
            let pid = instance(&status(&m), "alpha")["pid"]
                .as_u64()
                .expect("alpha's pid");
            std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap();
            // Dead (a zombie until the daemon reaps it), not yet noticed.
            let t = Instant::now();
            while std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
            {
                assert!(t.elapsed() < Duration::from_secs(5), "QEMU {pid} lives on");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let r = m.run(&["boot", &demo()]).ok();
        let said = format!("{}{}", r.text(), r.stderr);
        assert!(
            !said.contains("alpha already ready"),
            "round {round}: {said}"
        );
        assert_eq!(
            instance(&status(&m), "alpha")["state"],
            "ready",
            "round {round}"
        );
        assert_eq!(sh(&m, "alpha", "echo back").trim(), "back");
    }

    // Stopping the daemon leaves no QEMU behind.
    m.run(&["daemon", "stop"]).ok();
    assert!(m.qemu_pids().is_empty(), "QEMU left: {:?}", m.qemu_pids());
}

#[test]
fn a_guest_spanning_two_nodes_sees_two_nodes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = booted("numa", "numa-span.toml");
    let nodes = sh(
        &m,
        "wide",
        "ls /sys/devices/system/node | grep node | tr '\\n' ' '",
    );
    assert_eq!(nodes.trim(), "node0 node1");
    assert_eq!(
        sh(&m, "wide", "cat /sys/devices/system/node/node0/cpulist").trim(),
        "0"
    );
    assert_eq!(
        sh(&m, "wide", "cat /sys/devices/system/node/node1/cpulist").trim(),
        "1"
    );
    // 384M split by CPUs: 192M per node (less what the kernel reserves).
    for n in 0..2 {
        let kb: u64 = sh(
            &m,
            "wide",
            &format!("grep MemTotal /sys/devices/system/node/node{n}/meminfo"),
        )
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .expect("node MemTotal");
        assert!((100 * 1024..=192 * 1024).contains(&kb), "node{n}: {kb} kB");
    }
}

#[test]
fn booting_an_invalid_topology_starts_nothing() {
    let m = Mkctl::new("invalid");
    let cfg = repo_root()
        .join("configs/invalid.toml")
        .display()
        .to_string();
    let r = m.run(&["boot", &cfg]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("nothing was started"), "{}", r.stderr);
    // No daemon was started, so no socket and no QEMU.
    assert!(!m.run_dir().join("mkctl.sock").exists());
    assert!(m.qemu_pids().is_empty());
    let st = m.run(&["status", "--json"]).ok().json();
    assert!(st["daemon"].is_null());
}

/// The kexec backend's window path, for real under QEMU: guest-init maps
/// the window through /dev/mem at the physical address given by
/// `mk.window=` (here the ivshmem BAR's address, learnt from a first boot)
/// and the ring traffic must be exactly as through `resource2`.
#[test]
fn window_through_dev_mem_carries_ring_traffic() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mkctl::new("devmem");
    let single = repo_root().join("tests/configs/single.toml");
    m.run(&["boot", &single.display().to_string()]).ok();
    // BAR 2 of the ivshmem device (1af4:1110), as the guest sees it.
    let bar = sh(
        &m,
        "solo",
        "for d in /sys/bus/pci/devices/*; do if [ \"$(cat $d/vendor)\" = 0x1af4 ] && [ \"$(cat $d/device)\" = 0x1110 ]; then sed -n 3p $d/resource; fi; done",
    );
    let fields: Vec<&str> = bar.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "no ivshmem BAR 2 in {bar:?}");
    let start = u64::from_str_radix(fields[0].trim_start_matches("0x"), 16).unwrap();
    let end = u64::from_str_radix(fields[1].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(end - start + 1, 4 << 20, "BAR 2 is the 4M window");
    m.run(&["stop", "--all"]).ok();

    let text = std::fs::read_to_string(&single).unwrap();
    let by_addr = text.replace(
        "memory = \"256M\"",
        &format!(
            "memory = \"256M\"\ncmdline = \"mk.window={start:#x}@{:#x}\"",
            4u64 << 20
        ),
    );
    let cfg = m.scratch.join("devmem.toml");
    std::fs::write(&cfg, by_addr).unwrap();
    m.run(&["boot", &cfg.display().to_string()]).ok();
    let console = m.run(&["console", "solo", "--tail", "200"]).ok().text();
    assert!(
        console.contains(&format!("window /dev/mem at {start:#x}")),
        "guest-init did not map /dev/mem:\n{console}"
    );
    for (from, to) in [("host", "solo"), ("solo", "host")] {
        let r = m
            .run(&[
                "traffic", from, to, "--count", "3000", "--size", "512", "--json",
            ])
            .ok()
            .json();
        assert_eq!(
            (r["good"].as_u64(), r["bad"].as_u64()),
            (Some(3000), Some(0)),
            "{from} -> {to}: {r}"
        );
    }
    assert_eq!(sh(&m, "solo", "echo via devmem").trim(), "via devmem");
}
