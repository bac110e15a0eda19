//! The DSM across real kernels under QEMU: a static C program built
//! against libmk exactly as the README says, copied into two guests with
//! `mkctl exec`, counts with a copy of itself on the host and on each
//! guest, all at once, and the total is exact on every kernel; `mkctl dsm`
//! shows and removes the region; and a guest killed while it holds a page
//! makes the host's access to that page fail with SIGBUS in bounded time.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mkctl_e2e::{booted, c_counter, host_testprog, Mkctl};

fn boot() -> Mkctl {
    booted("dsm", "migrate.toml")
}

/// Copies the C counter into `on` as /tmp/counter, as the README does.
fn install(m: &Mkctl, on: &str) {
    let prog = std::fs::read(c_counter()).expect("counter binary");
    m.run_with_input(
        &[
            "exec",
            on,
            "--",
            "sh",
            "-c",
            "cat > /tmp/counter && chmod +x /tmp/counter",
        ],
        &prog,
    )
    .ok();
}

fn host_counter(m: &Mkctl) -> Command {
    let mut c = Command::new(c_counter());
    c.env("MK_AGENT", m.run_dir().join("agent.sock"));
    c
}

#[test]
fn a_c_program_counts_on_the_host_and_two_guests_and_the_total_is_exact() {
    let m = boot();
    install(&m, "alpha");
    install(&m, "beta");
    const N: u32 = 1500;
    let n = N.to_string();
    let t0 = Instant::now();
    let guests: Vec<_> = ["alpha", "beta"]
        .iter()
        .map(|on| {
            m.command()
                .args(["exec", on, "--", "/tmp/counter", "together", &n])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("mkctl exec")
        })
        .collect();
    let host = host_counter(&m)
        .args(["together", &n])
        .output()
        .expect("host counter");
    assert!(host.status.success(), "host: {host:?}");
    for g in guests {
        let out = g.wait_with_output().expect("guest counter");
        assert!(out.status.success(), "guest: {out:?}");
    }
    eprintln!("3 x {N} increments in {:?}", t0.elapsed());
    let want = format!("counter={}", 3 * N);
    for on in ["alpha", "beta"] {
        let out = m
            .run(&["exec", on, "--", "/tmp/counter", "together", "0"])
            .ok();
        assert_eq!(out.text().trim(), want, "on {on}");
    }
    let out = host_counter(&m).args(["together", "0"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        want,
        "on the host"
    );

    // mkctl dsm: the region, its home, every kernel's counters.
    let ls = m.run(&["dsm", "ls", "--json"]).ok().json();
    let r = &ls[0];
    assert_eq!(r["name"], "together", "{ls}");
    assert_eq!(r["size"], 4096);
    let show = m.run(&["dsm", "show", "together", "--json"]).ok().json();
    let kernels: Vec<&str> = show[0]["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kernel"].as_str().unwrap())
        .collect();
    for k in ["host", "alpha", "beta"] {
        assert!(kernels.contains(&k), "{show}");
    }
    let faults: u64 = show[0]["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["write_faults"].as_u64().unwrap() + k["read_faults"].as_u64().unwrap())
        .sum();
    assert!(faults >= 3, "{show}");
    m.run(&["dsm", "rm", "together"]).ok();
    assert_eq!(
        m.run(&["dsm", "ls", "--json"]).ok().json(),
        serde_json::json!([])
    );
    let gone = m.run(&["dsm", "show", "together"]);
    assert_eq!(gone.code, 2, "{}", gone.stderr);
}

#[test]
fn a_killed_guest_takes_its_pages_and_the_host_gets_sigbus() {
    let m = boot();
    install(&m, "beta");
    // Beta creates the region (its home) and writes its page.
    m.run(&["exec", "beta", "--", "/tmp/counter", "onbeta", "7"])
        .ok();
    let mut touch = Command::new(host_testprog("dsmtest"))
        .args(["touch", "onbeta", "4096", "0"])
        .env("MK_AGENT", m.run_dir().join("agent.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("dsmtest");
    let mut out = BufReader::new(touch.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "mapped");
    // Kill beta's QEMU.
    let st = m.run(&["status", "--json"]).ok().json();
    let pid = st["daemon"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "beta")
        .and_then(|i| i["pid"].as_u64())
        .expect("beta's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = Instant::now();
    touch.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let status = touch.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc_sigbus()), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    let show = m.run(&["dsm", "show", "onbeta", "--json"]).ok().json();
    let host = show[0]["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kernel"] == "host")
        .cloned()
        .unwrap();
    assert!(host["failed"].as_u64().unwrap() >= 1, "{show}");
    assert!(
        host["error"]
            .as_str()
            .unwrap_or("")
            .contains("home is lost"),
        "{show}"
    );
    // Its name can be mapped again: a new region, zero-filled, homed on
    // the host now, of any size (`get` reads two pages).
    let host_dsmtest = |args: &[&str]| {
        let out = Command::new(host_testprog("dsmtest"))
            .args(args)
            .env("MK_AGENT", m.run_dir().join("agent.sock"))
            .output()
            .expect("dsmtest");
        assert!(out.status.success(), "dsmtest {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    host_dsmtest(&["add", "onbeta", "8192", "3"]);
    let got = host_dsmtest(&["get", "onbeta", "8192"]);
    assert!(got.starts_with("atomic=3"), "{got}");
}

fn libc_sigbus() -> i32 {
    nix::sys::signal::Signal::SIGBUS as i32
}

/// `dsmtest args...` on `on` ("host" runs it here, through the daemon's
/// agent socket); checks it exits 0 and returns its output.
fn dsmtest(m: &Mkctl, on: &str, args: &[&str]) -> std::process::Child {
    if on == "host" {
        Command::new(host_testprog("dsmtest"))
            .args(args)
            .env("MK_AGENT", m.run_dir().join("agent.sock"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dsmtest")
    } else {
        let mut a = vec!["exec", on, "--", "/bin/dsmtest"];
        a.extend_from_slice(args);
        m.command()
            .args(&a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mkctl exec dsmtest")
    }
}

fn all_ok(jobs: Vec<(&str, std::process::Child)>) -> Vec<String> {
    jobs.into_iter()
        .map(|(on, c)| {
            let out = c.wait_with_output().expect("wait");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{on}: {:?}\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            text
        })
        .collect()
}

/// Under a lock built on a DSM page, a producer and a consumer, and random
/// reads and writes with per-page versions, across the host and two guests.
#[test]
fn locks_ordered_records_and_random_access_hold_across_three_kernels() {
    let m = boot();
    // A spinlock on page 2 guards a plain counter on page 1.
    let jobs = ["host", "alpha", "beta"]
        .into_iter()
        .map(|on| (on, dsmtest(&m, on, &["locked", "lk", "12288", "40"])))
        .collect();
    all_ok(jobs);
    let got = all_ok(vec![("beta", dsmtest(&m, "beta", &["get", "lk", "12288"]))]);
    assert_eq!(got[0].trim(), "atomic=0 locked=120");
    // Records written on alpha arrive on beta in order, intact.
    all_ok(vec![
        (
            "alpha",
            dsmtest(&m, "alpha", &["produce", "pc", "16384", "40"]),
        ),
        (
            "beta",
            dsmtest(&m, "beta", &["consume", "pc", "16384", "40"]),
        ),
    ]);
    // Random reads and writes never see a page's version go back.
    let out = all_ok(
        [("host", "1"), ("alpha", "2"), ("beta", "3")]
            .into_iter()
            .map(|(on, seed)| {
                (
                    on,
                    dsmtest(&m, on, &["stress", "st", "32768", "4000", seed]),
                )
            })
            .collect(),
    );
    for o in out {
        assert!(o.starts_with("done stress"), "{o}");
        eprintln!("{}", o.trim());
    }
}
