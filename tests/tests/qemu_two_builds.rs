//! Two kernel builds side by side under QEMU (`tests/configs/two-builds.toml`):
//! alpha boots the stock kernel (`kernel = "auto"`), beta Debian's 6.12
//! cloud kernel (`kernel = "auto-6.12"`). Each guest runs the release its
//! cache says (`uname -r` through `mkctl exec`, and the two differ); each
//! initramfs holds the modules of its own kernel, which load: the 6.1
//! guest's virtio console driver and `unix_diag`, the 6.12 guest's
//! `unix_diag` (it builds virtio in); both guests' doorbell ports come up
//! and both ring; and messages go round trip host <-> each guest and
//! between the guests. A missing 6.12 kernel fails the test (setup.sh
//! fetches it), it is never skipped.

use std::time::{Duration, Instant};

use mkctl_e2e::{cache_dir, repo_root, Artifacts, Mkctl, SeriesKernel};

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
    let cfg = repo_root()
        .join("tests/configs/two-builds.toml")
        .display()
        .to_string();
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
        let log = std::fs::read_to_string(m.run_dir().join(guest).join("console.log"))
            .unwrap_or_default();
        assert!(
            log.contains("agent: doorbell port org.mkctl.doorbell ready"),
            "{guest} has no doorbell port; its console:\n{log}"
        );
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
