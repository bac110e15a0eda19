//! `mkctl doctor` on this machine, through the real binary: after
//! `scripts/setup.sh`, everything the QEMU backend needs is ok and the
//! command exits 0; with an empty cache it names what is missing, says to
//! run the setup, and exits 1. (Each missing piece alone is tested against
//! fake roots in `mkctl/src/doctor.rs`.)

use mkctl_e2e::Mkctl;

#[test]
fn doctor_after_setup_finds_what_the_qemu_backend_needs() {
    let m = Mkctl::new("doctor");
    let out = m.run(&["doctor", "--json"]);
    let v = out.json();
    assert_eq!(out.code, 0, "{}\n{}", out.text(), out.stderr);
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["qemu_ready"], true, "{v:#}");
    let checks = v["checks"].as_array().expect("a list of checks");
    for c in checks {
        for key in ["name", "backend", "ok", "detail", "fix"] {
            assert!(c.get(key).is_some(), "{key} missing in {c}");
        }
        assert!(
            ["qemu", "migration", "kexec"].contains(&c["backend"].as_str().unwrap()),
            "{c}"
        );
        // A piece that is missing says what to do; one that is there does not.
        assert_eq!(c["ok"].as_bool().unwrap(), c["fix"].is_null(), "{c}");
    }
    let check = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {v:#}"))
    };
    for name in [
        "qemu",
        "guest-kernel",
        "guest-kernel-6.12",
        "guest-initramfs",
        "shm",
    ] {
        assert_eq!(check(name)["ok"], true, "{}", check(name));
    }
    let qemu = check("qemu")["detail"].as_str().unwrap().to_string();
    assert!(qemu.contains("QEMU emulator version"), "{qemu}");
    let kernel = check("guest-kernel")["detail"]
        .as_str()
        .unwrap()
        .to_string();
    let cache = mkctl_e2e::cache_dir().display().to_string();
    assert!(kernel.contains(&cache), "{kernel} is not in {cache}");
    // setup.sh fetched the 6.12 kernel too.
    let k612 = check("guest-kernel-6.12")["detail"].as_str().unwrap();
    assert!(
        k612.contains("kernel-6.12/vmlinuz (release 6.12."),
        "{k612}"
    );
    // Sized against the checkout's demo topology.
    let shm = check("shm")["detail"].as_str().unwrap().to_string();
    assert!(shm.contains("configs/demo.toml needs"), "{shm}");
    // The kexec backend is reported either way, and never fails doctor.
    assert!(checks.iter().any(|c| c["backend"] == "kexec"));
}

#[test]
fn doctor_with_an_empty_cache_says_to_run_the_setup_and_fails() {
    let m = Mkctl::new("doctor-empty");
    let empty = m.scratch.join("empty-cache");
    std::fs::create_dir_all(&empty).unwrap();
    let out = m
        .command()
        .env("MKCTL_CACHE", &empty)
        .env_remove("MKCTL_KERNEL")
        .env_remove("MKCTL_GUEST_INIT")
        .arg("doctor")
        .output()
        .expect("run mkctl doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in\n{text}"))
            .to_string()
    };
    for name in ["guest-kernel", "guest-initramfs"] {
        let l = line(name);
        assert!(l.starts_with("MISSING"), "{l}");
        assert!(l.contains(&empty.display().to_string()), "{l}");
        assert!(l.contains("run scripts/setup.sh"), "{l}");
    }
    assert!(line("qemu").starts_with("ok"), "{text}");
    assert!(text.contains("QEMU backend: NOT READY"), "{text}");

    // A topology that cannot be read is a usage error, in JSON too.
    let out = m.run(&["doctor", "--json", "--topology", "/nonexistent/t.toml"]);
    assert_eq!(out.code, 2, "{}\n{}", out.text(), out.stderr);
    assert!(out.json()["error"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/t.toml"));
}
