//! The command line as a user meets it: exit codes, what goes to stdout and
//! stderr, JSON for scripts, help, completions and the man page.

mod common;

use assert_cmd::cargo::cargo_bin_cmd;
use predicates::prelude::*;

#[test]
fn validate_exit_codes() {
    cargo_bin_cmd!("mkctl")
        .arg("validate")
        .arg(common::config("demo"))
        .assert()
        .code(0)
        .stdout(predicate::str::contains(
            "valid (2 instance(s), 0 warning(s))",
        ));
    cargo_bin_cmd!("mkctl")
        .arg("validate")
        .arg(common::config("invalid"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("invalid.toml:26:8"))
        .stderr(predicate::str::contains(
            "7 error(s), 0 warning(s); nothing was started",
        ));
    // A file that cannot be read is a usage error, and says which file.
    cargo_bin_cmd!("mkctl")
        .args(["validate", "/no/such/topology.toml"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "cannot read topology file /no/such/topology.toml",
        ));
    cargo_bin_cmd!("mkctl")
        .args(["validate", "--bogus"])
        .assert()
        .code(2);
}

#[test]
fn validate_json_lists_every_finding_with_location() {
    let out = cargo_bin_cmd!("mkctl")
        .args(["validate", "--json"])
        .arg(common::config("invalid"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let ds = v["diagnostics"].as_array().unwrap();
    assert_eq!(ds.len(), 7);
    let conflict = ds.iter().find(|d| d["code"] == "cpu-conflict").unwrap();
    assert_eq!(conflict["line"], 26);
    assert_eq!(conflict["column"], 8);
    assert_eq!(
        conflict["instances"],
        serde_json::json!(["alpha", "alpha (2nd)"])
    );
    assert!(conflict["help"].as_str().unwrap().contains("cpus = \"3\""));
}

#[test]
fn plan_report_and_json() {
    cargo_bin_cmd!("mkctl")
        .arg("plan")
        .arg(common::config("demo"))
        .assert()
        .success()
        .stdout(predicate::str::contains("alpha           1  qemu    1"))
        .stdout(predicate::str::contains("[0x80000000-0x90000000)"));
    let out = cargo_bin_cmd!("mkctl")
        .args(["plan", "--json"])
        .arg(common::config("large"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 5);
    let db = inst.iter().find(|i| i["name"] == "db").unwrap();
    assert_eq!(db["placement"], "given");
    assert_eq!(db["memory"]["start"], "0x1000000000");
    assert_eq!(db["memory_size"], 48u64 << 30);
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4);
    assert_eq!(nodes[0]["cpus_host"], "0-3");
    assert_eq!(nodes[0]["cpu_utilisation_pct"], 75.0);
    // Invalid topologies get no plan, only the findings.
    cargo_bin_cmd!("mkctl")
        .arg("plan")
        .arg(common::config("invalid"))
        .assert()
        .code(1)
        .stdout(predicate::str::is_empty());
}

#[test]
fn dtb_refuses_an_unknown_instance() {
    cargo_bin_cmd!("mkctl")
        .args(["dtb", "--instance", "gamma"])
        .arg(common::config("demo"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "has no instance \"gamma\"; it has: alpha, beta",
        ));
}

#[test]
fn help_completions_and_man() {
    cargo_bin_cmd!("mkctl")
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "Exit codes: 0 success; 1 invalid topology",
        ));
    cargo_bin_cmd!("mkctl")
        .args(["completions", "bash"])
        .assert()
        .success()
        .stdout(predicate::str::contains("_mkctl()"));
    cargo_bin_cmd!("mkctl")
        .arg("man")
        .assert()
        .success()
        .stdout(predicate::str::contains(".TH mkctl"));
}

#[test]
fn kexec_boot_is_refused_here_and_changes_nothing() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    cargo_bin_cmd!("mkctl")
        .arg("boot")
        .arg(common::config("kexec"))
        .env("MKCTL_RUN_DIR", tempfile::tempdir().unwrap().path())
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "cannot boot \"worker\" with backend = \"kexec\"",
        ))
        .stderr(predicate::str::contains(
            "/sys/fs/multikernel does not exist",
        ))
        .stderr(predicate::str::contains("set backend = \"qemu\""));
    assert_eq!(std::fs::read_to_string("/proc/mounts").unwrap(), mounts);
    assert_eq!(
        std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap(),
        online
    );
    // The dry run prints the exact sequence against a model, still
    // changing nothing.
    cargo_bin_cmd!("mkctl")
        .args(["boot", "--dry-run"])
        .arg(common::config("kexec"))
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "mount(\"none\", \"/sys/fs/multikernel\", \"multikernel\", 0, NULL)",
        ))
        .stdout(predicate::str::contains("kexec_file_load("))
        .stdout(predicate::str::contains("nothing was changed"));
    assert_eq!(std::fs::read_to_string("/proc/mounts").unwrap(), mounts);
    cargo_bin_cmd!("mkctl")
        .args(["pool", "release"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no multikernel interface"));
}

/// On a kernel of the instance-descriptor generation (fixture
/// `mk-descriptors`), `host` names it, and `boot` (dry run too), `stop`
/// and `pool release` refuse it without a single kernel call.
#[test]
fn descriptor_generation_is_named_and_refused() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysroot/mk-descriptors");
    cargo_bin_cmd!("mkctl")
        .arg("--sysroot")
        .arg(&root)
        .arg("host")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "interface generation descriptors (no /proc/kimage",
        ))
        .stdout(predicate::str::contains("does not support yet"));
    for dry in [false, true] {
        let mut c = cargo_bin_cmd!("mkctl");
        c.arg("--sysroot").arg(&root).arg("boot");
        if dry {
            c.arg("--dry-run");
        }
        c.arg(common::config("kexec"))
            .env("MKCTL_RUN_DIR", tempfile::tempdir().unwrap().path())
            .assert()
            .code(1)
            .stdout(predicate::str::contains("kexec_file_load").not())
            .stderr(predicate::str::contains(
                "it speaks the instance-descriptor interface of multikernel/linux v7.0-mk5",
            ))
            .stderr(predicate::str::contains(
                "Boot a host kernel of the v1 or current generation",
            ));
    }
    for args in [
        &["stop", "web"][..],
        &["stop", "--dry-run", "web"][..],
        &["pool", "release"][..],
    ] {
        cargo_bin_cmd!("mkctl")
            .arg("--sysroot")
            .arg(&root)
            .args(args)
            .env("MKCTL_RUN_DIR", tempfile::tempdir().unwrap().path())
            .assert()
            .code(1)
            .stdout(predicate::str::is_empty())
            .stderr(predicate::str::contains("does not support that generation"));
    }
}

/// A missing stock kernel is found before the daemon would start: one
/// message naming the file and the variables, exit 1, no run directory.
#[test]
fn boot_without_the_stock_kernel_starts_no_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    cargo_bin_cmd!("mkctl")
        .arg("boot")
        .arg(common::config("demo"))
        .env("MKCTL_RUN_DIR", &run)
        .env("MKCTL_CACHE", dir.path().join("no-cache"))
        .env_remove("MKCTL_KERNEL")
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "no-cache/kernel/vmlinuz, which does not exist",
        ))
        .stderr(predicate::str::contains("MKCTL_CACHE"));
    assert!(!run.exists(), "a daemon was started");
}

#[test]
fn dtb_current_generation_baseline_and_overlay() {
    cargo_bin_cmd!("mkctl")
        .args(["dtb", "--abi", "current", "--dts"])
        .arg(common::config("kexec"))
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "compatible = \"linux,multikernel-host\";",
        ))
        .stdout(predicate::str::contains("numa-node-id = <0x1>;"));
    cargo_bin_cmd!("mkctl")
        .args(["dtb", "--abi", "current", "--overlay", "worker", "--dts"])
        .arg(common::config("kexec"))
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "compatible = \"linux,multikernel-overlay\";",
        ))
        .stdout(predicate::str::contains("instance-name = \"worker\";"));
    cargo_bin_cmd!("mkctl")
        .args(["dtb", "--overlay", "worker", "--dts"])
        .arg(common::config("kexec"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--overlay needs --abi current"));
}

/// Under `--json`, every failure is also JSON on stdout with its exit code:
/// bad arguments (2), no daemon (1), a usage error found by mkctl (2).
#[test]
fn json_failures_are_json_with_the_exit_code() {
    let run = tempfile::tempdir().unwrap();
    let json_of = |args: &[&str], code: i32| {
        let out = cargo_bin_cmd!("mkctl")
            .env("MKCTL_RUN_DIR", run.path())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {out:?}"));
        assert_eq!(v["exit_code"], code, "{v}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("mkctl:")
                || String::from_utf8_lossy(&out.stderr).contains("error:"),
            "{out:?}"
        );
        v["error"].as_str().unwrap().to_string()
    };
    let e = json_of(&["ping", "alpha", "beta", "--count", "0", "--json"], 2);
    assert!(!e.is_empty());
    let e = json_of(&["ping", "alpha", "beta", "--json"], 1);
    assert!(e.contains("no mkctl daemon runs"), "{e}");
    let e = json_of(&["migrate", "1", "--from", "a", "--to", "b", "--json"], 1);
    assert!(e.contains("mkctl boot"), "{e}");
    // `--from` defaults to the host: `mkctl migrate <pid> --to <kernel>` is
    // a whole command (it gets as far as looking for the daemon).
    let e = json_of(&["migrate", "1", "--to", "b", "--json"], 1);
    assert!(e.contains("mkctl boot"), "{e}");
    // Without --json, stdout stays empty.
    cargo_bin_cmd!("mkctl")
        .env("MKCTL_RUN_DIR", run.path())
        .args(["ping", "alpha", "beta"])
        .assert()
        .code(1)
        .stdout(predicate::str::is_empty());
    // A --json after `--` belongs to the remote command, not to mkctl.
    cargo_bin_cmd!("mkctl")
        .env("MKCTL_RUN_DIR", run.path())
        .args(["exec", "alpha", "--bogus", "--", "prog", "--json"])
        .assert()
        .code(2)
        .stdout(predicate::str::is_empty());
}

/// A daemon nobody can reach any more (its run directory was removed, as
/// when a test that started it is killed) stops by itself instead of
/// running for ever.
#[test]
fn a_daemon_whose_run_directory_is_removed_exits() {
    let run = tempfile::tempdir().unwrap();
    let dir = run.path().join("run");
    let mut daemon = std::process::Command::new(assert_cmd::cargo::cargo_bin!("mkctl"))
        .args(["daemon", "run"])
        .env("MKCTL_RUN_DIR", &dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    // The daemon binds its socket, then writes its pid file: a directory
    // removed in between makes it fail to start (exit 1), not the case here.
    while !dir.join("mkctl.sock").exists() || !dir.join("daemon.pid").exists() {
        assert!(t0.elapsed().as_secs() < 20, "the daemon never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let t0 = std::time::Instant::now();
    loop {
        if let Some(st) = daemon.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        if t0.elapsed().as_secs() >= 10 {
            let _ = daemon.kill();
            panic!("the daemon still runs 10 s after its run directory went");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut err = String::new();
    std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("nobody can reach this daemon"), "{err}");
}

/// `--help` says which environment variables mkctl reads.
#[test]
fn help_names_the_environment() {
    let out = cargo_bin_cmd!("mkctl").arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for var in [
        "MKCTL_RUN_DIR",
        "MKCTL_CACHE",
        "MKCTL_KERNEL",
        "MKCTL_QEMU",
        "MKCTL_DOORBELL",
    ] {
        assert!(text.contains(var), "--help does not name {var}:\n{text}");
    }
}

/// `doctor`, `restart` and `stop` as scripts meet them without a daemon:
/// documented exit codes, JSON, every path read under --sysroot, and
/// refusals that say what to do.
#[test]
fn doctor_restart_and_stop_arguments() {
    let help = cargo_bin_cmd!("mkctl")
        .args(["doctor", "--help"])
        .output()
        .unwrap();
    // Words as clap wraps them, on one line.
    let help = String::from_utf8_lossy(&help.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for words in [
        "Exit codes: 0 when everything the QEMU backend and migration",
        "\"n/a\" (not available here)",
        "1 when something",
        "2 usage error",
    ] {
        assert!(
            help.contains(words),
            "doctor --help lacks {words:?}:\n{help}"
        );
    }

    // A fake multikernel host with nothing of the QEMU backend: the kexec
    // backend is ready, QEMU is missing (looked for under the sysroot), so
    // doctor fails and says so in its JSON.
    let root = common::repo().join("mkctl/tests/fixtures/sysroot/mk-current");
    let out = cargo_bin_cmd!("mkctl")
        .arg("--sysroot")
        .arg(&root)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = |name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {v:#}"))
            .clone()
    };
    assert_eq!(v["ok"], false);
    assert_eq!(check("qemu")["ok"], false, "{v:#}");
    assert!(check("qemu")["fix"]
        .as_str()
        .unwrap()
        .contains("qemu-system-x86"));
    let mk = check("multikernel");
    assert_eq!(mk["ok"], true, "{mk}");
    assert!(
        mk["detail"]
            .as_str()
            .unwrap()
            .contains("generation current"),
        "{mk}"
    );
    assert!(
        mk["detail"]
            .as_str()
            .unwrap()
            .starts_with(&root.display().to_string()),
        "{mk}"
    );

    cargo_bin_cmd!("mkctl")
        .args(["doctor", "--topology", "/no/such/topology.toml"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("/no/such/topology.toml"));

    let run = tempfile::tempdir().unwrap();
    cargo_bin_cmd!("mkctl")
        .env("MKCTL_RUN_DIR", run.path())
        .arg("restart")
        .assert()
        .code(2);
    cargo_bin_cmd!("mkctl")
        .env("MKCTL_RUN_DIR", run.path())
        .args(["restart", "alpha"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("mkctl boot"));
    cargo_bin_cmd!("mkctl")
        .env("MKCTL_RUN_DIR", run.path())
        .args(["stop", "alpha", "--force", "--timeout", "3"])
        .assert()
        .code(2);
    // The kernel's own instances stop by the kernel's escalation.
    let out = cargo_bin_cmd!("mkctl")
        .env("MKCTL_RUN_DIR", run.path())
        .arg("--sysroot")
        .arg(&root)
        .args(["stop", "web", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("--json and --force apply to QEMU instances; web is kexec"),
        "{v}"
    );
}

/// A daemon started in the background holds nothing its starter inherited:
/// a pipe a script waits on (`mkctl daemon restart | tee log`, a CI
/// runner's) reaches its end when mkctl exits, not when the daemon does.
#[test]
fn a_background_daemon_keeps_no_inherited_descriptor() {
    use std::os::fd::AsRawFd;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let run = tempfile::tempdir().unwrap();
    let dir = run.path().join("run");
    let mkctl = || {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin!("mkctl"));
        c.env("MKCTL_RUN_DIR", &dir);
        c
    };
    // Inherited by mkctl, as a leaked descriptor is (no close-on-exec).
    let (r, w) = nix::unistd::pipe().unwrap();
    let out = mkctl()
        .args(["daemon", "restart"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    drop(w);
    assert!(out.success(), "{out}");
    assert!(dir.join("daemon.pid").exists(), "no daemon started");
    let pid = std::fs::read_to_string(dir.join("daemon.pid")).unwrap();
    let held = std::fs::read_dir(format!("/proc/{}/fd", pid.trim()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| {
            let ours = std::fs::read_link(format!("/proc/self/fd/{}", r.as_raw_fd())).unwrap();
            l == ours
        });
    let stop = mkctl().args(["daemon", "stop"]).output().unwrap();
    assert!(stop.status.success(), "{stop:?}");
    assert!(!held, "the daemon holds the pipe its starter inherited");
    // And the pipe ends now that nobody holds its write end.
    nix::fcntl::fcntl(
        &r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(&r, &mut b) {
            Ok(0) => break,
            Err(nix::errno::Errno::EAGAIN) if t0.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => panic!("the pipe did not end: {other:?}"),
        }
    }
}

/// `mkctl events` with a daemon that runs no instance: without a daemon it
/// fails at once (1, JSON under --json); with one, every reader gets the
/// daemon's stop and ends with 0, a reader whose stdout was closed ends
/// with 0 too, a reader that vanished is forgotten, and none of them holds
/// the daemon up.
#[test]
fn events_end_with_the_daemon_and_never_hold_it() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let run = tempfile::tempdir().unwrap();
    let dir = run.path().join("run");
    let mkctl = || {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin!("mkctl"));
        c.env("MKCTL_RUN_DIR", &dir);
        c
    };
    let out = mkctl().args(["events", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no mkctl daemon runs"),
        "{v}"
    );
    assert!(
        !dir.join("mkctl.sock").exists(),
        "events must not start a daemon"
    );

    // A daemon that does not know the request (an older build) hangs up
    // at once: said so, not taken for the daemon stopping.
    std::fs::create_dir_all(&dir).unwrap();
    let old = std::os::unix::net::UnixListener::bind(dir.join("mkctl.sock")).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut c, _) = old.accept().unwrap();
        let mut b = [0u8; 64];
        let _ = std::io::Read::read(&mut c, &mut b);
    });
    let out = mkctl().args(["events"]).output().unwrap();
    fake.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("older mkctl build"),
        "{out:?}"
    );
    std::fs::remove_file(dir.join("mkctl.sock")).unwrap();

    let mut daemon = mkctl()
        .args(["daemon", "run"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !dir.join("daemon.pid").exists() {
        assert!(t0.elapsed().as_secs() < 20, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let spawn = |args: &[&str]| {
        mkctl()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let json = spawn(&["events", "--json", "--last", "5"]);
    let human = spawn(&["events"]);
    // Its stdout closed at once, as `mkctl events | head -0` would.
    let mut closed = spawn(&["events"]);
    drop(closed.stdout.take());
    // Gone without a word.
    let mut vanished = spawn(&["events"]);
    // Time to connect and subscribe.
    std::thread::sleep(Duration::from_millis(500));
    vanished.kill().unwrap();
    vanished.wait().unwrap();

    let t0 = Instant::now();
    // (`daemon stop` waits for the daemon's pid to go: reap it meanwhile.)
    let stop = mkctl().args(["daemon", "stop"]).spawn().unwrap();
    let st = daemon.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(stop.wait_with_output().unwrap().status.success());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the daemon took {:?} to stop",
        t0.elapsed()
    );

    let json = json.wait_with_output().unwrap();
    assert_eq!(json.status.code(), Some(0), "{json:?}");
    let text = String::from_utf8(json.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["event"], "daemon-stopping");
    assert_eq!(lines[0]["seq"], 1);
    assert!(lines[0]["time_ms"].as_u64().unwrap() > 1_600_000_000_000);

    let human = human.wait_with_output().unwrap();
    assert_eq!(human.status.code(), Some(0), "{human:?}");
    let line = String::from_utf8(human.stdout.clone()).unwrap();
    assert!(line.ends_with(" daemon stopping\n"), "{line:?}");
    assert!(
        String::from_utf8_lossy(&human.stderr).contains("the daemon stopped"),
        "{human:?}"
    );
    let closed = closed.wait_with_output().unwrap();
    assert_eq!(closed.status.code(), Some(0), "{closed:?}");

    let mut err = String::new();
    std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(err.matches("events: a subscriber (").count(), 4, "{err}");
    assert_eq!(err.matches("events: a subscriber left").count(), 4, "{err}");
}

/// A thread's move (PID/TID) takes neither --tree nor --any-cpu: a usage
/// error (exit 2) saying why, before any daemon is asked.
#[test]
fn a_thread_move_refuses_the_options_of_a_process_move() {
    let run = tempfile::tempdir().unwrap();
    for (opt, why) in [
        ("--tree", "give one or the other"),
        ("--any-cpu", "--any-cpu is for a process's move"),
    ] {
        cargo_bin_cmd!("mkctl")
            .env("MKCTL_RUN_DIR", run.path())
            .args(["migrate", "10/11", "--from", "alpha", "--to", "beta", opt])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(why));
    }
}
