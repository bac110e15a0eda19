//! Two kernel builds side by side under QEMU (`tests/configs/two-builds.toml`):
//! alpha boots the stock kernel (`kernel = "auto"`), beta Debian's 6.12
//! cloud kernel (`kernel = "auto-6.12"`). Each guest runs the release its
//! cache says (`uname -r` through `mkctl exec`, and the two differ); each
//! initramfs holds the modules of its own kernel, which load: the 6.1
//! guest's virtio console driver and `unix_diag`, the 6.12 guest's
//! `unix_diag` (it builds virtio in); both guests' doorbell ports come up
//! and both ring; and messages go round trip host <-> each guest and
//! between the guests. A process moves between the two builds, both ways,
//! through the vDSO proxy (`mknode/src/migrate/README.md`). A missing 6.12
//! kernel fails the tests (setup.sh fetches it), they are never skipped.

use std::time::{Duration, Instant};

use mkctl_e2e::{
    assert_doorbell_ready, booted, cache_dir, exec_watched, migrate_json, no_gap, pid_on,
    test_config, Artifacts, Mkctl, SeriesKernel,
};

/// `mkctl exec <on> -- sh -c <script>`, its stdout.
fn sh(m: &Mkctl, on: &str, script: &str) -> String {
    m.run(&["exec", on, "--", "sh", "-c", script]).ok().text()
}

/// The modules `/proc/modules` lists on `on`.
fn loaded_modules(m: &Mkctl, on: &str) -> Vec<String> {
    sh(m, on, "cat /proc/modules")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The `.ko` files of the cache's `modules/` directory, sorted.
fn cached_modules(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run qemu/setup.sh)", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ko"))
        .collect();
    v.sort();
    v
}

#[test]
fn each_guest_runs_the_kernel_build_it_was_given() {
    let stock = Artifacts::require();
    let new = SeriesKernel::require("6.12");
    assert_ne!(
        stock.kernel_release, new.release,
        "the cache's two kernels are one release"
    );
    assert!(
        new.release.starts_with("6.12."),
        "kernel-6.12/version says {}",
        new.release
    );
    let m = Mkctl::new("two-builds");
    let cfg = test_config("two-builds.toml");
    // The doorbell is part of what is checked: whatever the caller's
    // environment says about it.
    let out = m
        .command()
        .env_remove("MKCTL_DOORBELL")
        .env_remove("MKCTL_KERNEL")
        .args(["boot", &cfg])
        .output()
        .expect("mkctl boot");
    assert!(
        out.status.success(),
        "boot: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Each guest runs the release of the kernel it was given.
    let alpha = sh(&m, "alpha", "uname -r").trim().to_string();
    let beta = sh(&m, "beta", "uname -r").trim().to_string();
    eprintln!("alpha runs {alpha}, beta runs {beta}");
    assert_eq!(alpha, stock.kernel_release, "alpha (kernel = \"auto\")");
    assert_eq!(beta, new.release, "beta (kernel = \"auto-6.12\")");
    assert_ne!(alpha, beta);

    // Each initramfs carries the modules of its own kernel (what setup.sh
    // copied from that kernel's package), and they loaded.
    let guest_dir = |on: &str| {
        let mut v: Vec<String> = sh(&m, on, "ls /lib/modules/mkctl")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        guest_dir("alpha"),
        cached_modules(&cache_dir().join("kernel/modules"))
    );
    let beta_kos = cached_modules(&new.modules);
    assert_eq!(guest_dir("beta"), beta_kos);
    assert!(
        beta_kos.contains(&"unix_diag.ko".to_string()),
        "{beta_kos:?}"
    );
    let alpha_loaded = loaded_modules(&m, "alpha");
    for module in ["virtio_console", "unix_diag"] {
        assert!(
            alpha_loaded.iter().any(|l| l == module),
            "alpha has no {module}: {alpha_loaded:?}"
        );
    }
    let beta_loaded = loaded_modules(&m, "beta");
    for ko in &beta_kos {
        let module = ko.trim_end_matches(".ko");
        assert!(
            beta_loaded.iter().any(|l| l == module),
            "beta (6.12) did not load its {module} from the initramfs: {beta_loaded:?}"
        );
    }
    // 6.12 builds the virtio console driver in (no module to load): its
    // ports are there all the same.
    let ports = sh(&m, "beta", "cat /sys/class/virtio-ports/*/name");
    assert!(
        ports.lines().any(|l| l.trim() == "org.mkctl.doorbell"),
        "beta has no doorbell port: {ports:?}"
    );

    // Both doorbell ports came up, and the relay knows both guests ring.
    for guest in ["alpha", "beta"] {
        assert_doorbell_ready(&m, guest);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = m.run(&["status", "--json"]).ok().json();
        let ringing = status["daemon"]["doorbell"]["guests_ringing"].as_u64();
        if ringing == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay does not know both guests ring: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Messages round trip to both kernels and between them.
    for (a, b) in [("host", "alpha"), ("host", "beta"), ("alpha", "beta")] {
        let out = m.run(&["ping", a, b, "--count", "3", "--json"]).ok();
        let v = out.json();
        assert!(
            v["rtt_median_ns"].as_u64().is_some_and(|ns| ns > 0),
            "ping {a} {b}: {}",
            out.text()
        );
    }
    for guest in ["alpha", "beta"] {
        let text = format!("hello {guest}\n");
        let out = m
            .run_with_input(&["exec", guest, "--", "cat"], text.as_bytes())
            .ok();
        assert_eq!(out.text(), text, "{guest} echoed something else");
    }
    m.run(&["stop", "--all"]).ok();
}

/// `[vdso]`'s start and every `r-xp` anonymous mapping of `pid` on `on`.
fn vdso_places(m: &Mkctl, on: &str, pid: u32) -> (u64, Vec<u64>) {
    let maps = sh(m, on, &format!("cat /proc/{pid}/maps"));
    let start = |l: &str| u64::from_str_radix(l.split('-').next().unwrap_or(""), 16).ok();
    let vdso = maps
        .lines()
        .find(|l| l.ends_with("[vdso]"))
        .and_then(start)
        .unwrap_or_else(|| panic!("no [vdso] in {pid} on {on}: {maps}"));
    let anon_code = maps
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 5 && f[1] == "r-xp"
        })
        .filter_map(start)
        .collect();
    (vdso, anon_code)
}

/// `mkcounter` (two counting threads and one calling `clock_gettime` in a
/// loop) moves from the 6.1 guest to the 6.12 guest and back, lazily and
/// stop-copy: after each move the copy runs on the other build, its
/// lines go on without a gap, its memory is the same, its clock never
/// went back (in the spinning thread, caught in the vDSO at the freeze
/// now and then) nor jumped, and the kernel's vDSO is elsewhere while the
/// old one's place holds the redirected copy.
#[test]
fn a_process_moves_between_the_two_builds_both_ways() {
    Artifacts::require();
    SeriesKernel::require("6.12");
    let m = booted("two-builds-move", "two-builds.toml");
    let w = exec_watched(
        &m,
        "alpha",
        &[
            "/bin/mkcounter",
            "--mem",
            "16M",
            "--threads",
            "2",
            "--interval-ms",
            "20",
            "--clock-spin",
        ],
    );
    let mut pid = pid_on(&m, "alpha");
    let (first_vdso, _) = vdso_places(&m, "alpha", pid);
    let checksum = |on: &str, pid: u32| {
        let k = w.checksums().len();
        m.run(&["exec", on, "--", "kill", "-USR1", &pid.to_string()])
            .ok();
        w.wait_for("a checksum", Duration::from_secs(30), |l| {
            l.iter().filter(|x| x.starts_with("checksum=")).count() > k
        });
        w.checksums()[k].clone()
    };
    let before = checksum("alpha", pid);
    let mut at = "alpha";
    for (hop, mode) in ["lazy", "stop-copy", "stop-copy", "lazy"]
        .into_iter()
        .enumerate()
    {
        let to = if at == "alpha" { "beta" } else { "alpha" };
        let r = migrate_json(&m, pid, at, to, mode);
        eprintln!("hop {hop} {at} -> {to} ({mode}): {r}");
        pid = r["new_pid"].as_u64().expect("new_pid") as u32;
        assert_eq!(pid_on(&m, to), pid);
        at = to;
        let seen = w.count("seq=");
        w.wait_for("output after the move", Duration::from_secs(30), |l| {
            l.iter().filter(|x| x.starts_with("seq=")).count() >= seen + 10
        });
        assert_eq!(checksum(at, pid), before, "memory changed at hop {hop}");
        // On the other build (beta, and alpha after a stay on beta) the
        // process's first vDSO place holds the redirected copy, and the
        // kernel's own is elsewhere.
        let (vdso, anon_code) = vdso_places(&m, at, pid);
        assert_ne!(
            vdso, first_vdso,
            "hop {hop}: [vdso] back at its first place"
        );
        assert!(
            anon_code.contains(&first_vdso),
            "hop {hop}: no redirected vDSO at {first_vdso:#x} ({anon_code:x?})"
        );
    }
    no_gap(&w.seqs());
    let lines = w.lines.lock().unwrap().clone();
    let field = |l: &str, name: &str| -> Option<u64> {
        l.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let monos: Vec<u64> = lines.iter().filter_map(|l| field(l, "mono_ms")).collect();
    for p in monos.windows(2) {
        assert!(
            p[1] >= p[0] && p[1] - p[0] < 5000,
            "CLOCK_MONOTONIC went from {} to {} ms",
            p[0],
            p[1]
        );
    }
    let spins: Vec<u64> = lines
        .iter()
        .filter_map(|l| field(l, "clock_spins"))
        .collect();
    assert!(spins.windows(2).all(|p| p[1] >= p[0]) && spins.last() > spins.first());
    assert!(
        lines
            .iter()
            .filter_map(|l| field(l, "clock_back"))
            .all(|b| b == 0),
        "the spinning thread saw its clock go back"
    );
    m.run(&["exec", at, "--", "kill", "-TERM", &pid.to_string()])
        .ok();
    let mut child = w.child;
    assert_eq!(child.wait().unwrap().code(), Some(143));
}
