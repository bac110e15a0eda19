//! The DSM across agents on the host kernel: three agents linked by a real
//! shared-memory window in /dev/shm (each standing for a kernel), each
//! serving its own processes on its own socket; `dsmtest` processes map
//! one region through different agents and share it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::agents::{net, Net};
use mknode::agent::Dsm;

fn dsmtest() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| common::testprog("dsmtest"))
}

/// The three agents, each serving processes at `<dir>/agent<N>.sock`.
struct Kernels {
    net: Net,
    dir: tempfile::TempDir,
}

fn kernels() -> Kernels {
    let net = net();
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, a) in net.agents.iter().enumerate() {
        a.facet::<Dsm>()
            .serve_local(&dir.path().join(format!("agent{i}.sock")))
            .expect("serving the local socket");
    }
    Kernels { net, dir }
}

impl Kernels {
    fn socket(&self, on: usize) -> PathBuf {
        self.dir.path().join(format!("agent{on}.sock"))
    }

    /// Starts `dsmtest args...` as a process of kernel `on`.
    fn spawn(&self, on: usize, args: &[&str]) -> Child {
        Command::new(dsmtest())
            .args(args)
            .env("MK_AGENT", self.socket(on))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dsmtest")
    }

    fn run(&self, on: usize, args: &[&str]) -> String {
        let out = wait(self.spawn(on, args), Duration::from_secs(120));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "dsmtest {args:?} on kernel {on}: {:?}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }
}

/// Waits for `c`, killing it after `t`.
fn wait(mut c: Child, t: Duration) -> Output {
    let deadline = std::time::Instant::now() + t;
    while c.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = c.kill();
            let out = c.wait_with_output().expect("output");
            panic!(
                "dsmtest did not finish in {t:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c.wait_with_output().expect("output")
}

fn all(k: &Kernels, jobs: &[(usize, Vec<String>)]) -> Vec<String> {
    let children: Vec<_> = jobs
        .iter()
        .map(|(on, a)| {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            (*on, k.spawn(*on, &a))
        })
        .collect();
    children
        .into_iter()
        .map(|(on, c)| {
            let out = wait(c, Duration::from_secs(180));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "kernel {on}: {:?}\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            text
        })
        .collect()
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn counters_on_three_kernels_are_exact() {
    let k = kernels();
    const N: u64 = 3000;
    let n = N.to_string();
    all(
        &k,
        &[
            (0, args(&["add", "ctr", "8192", &n])),
            (1, args(&["add", "ctr", "8192", &n])),
            (2, args(&["add", "ctr", "8192", &n])),
        ],
    );
    let m = (N / 10).to_string();
    all(
        &k,
        &[
            (0, args(&["locked", "ctr", "8192", &m])),
            (1, args(&["locked", "ctr", "8192", &m])),
            (2, args(&["locked", "ctr", "8192", &m])),
        ],
    );
    for on in 0..3 {
        assert_eq!(
            k.run(on, &["get", "ctr", "8192"]).trim(),
            format!("atomic={} locked={}", 3 * N, 3 * (N / 10)),
            "as kernel {on} sees it"
        );
    }
    // Two processes on one kernel share that kernel's copy.
    all(
        &k,
        &[
            (1, args(&["add", "ctr", "8192", &n])),
            (1, args(&["add", "ctr", "8192", &n])),
        ],
    );
    assert!(k
        .run(2, &["get", "ctr", "8192"])
        .starts_with(&format!("atomic={}", 5 * N)));
}

#[test]
fn a_consumer_sees_every_record_in_order() {
    let k = kernels();
    all(
        &k,
        &[
            (1, args(&["produce", "pipe", "16384", "300"])),
            (2, args(&["consume", "pipe", "16384", "300"])),
        ],
    );
}

#[test]
fn random_reads_and_writes_never_go_back_in_time() {
    let k = kernels();
    let out = all(
        &k,
        &[
            (0, args(&["stress", "st", "65536", "3000", "1"])),
            (1, args(&["stress", "st", "65536", "3000", "2"])),
            (2, args(&["stress", "st", "65536", "3000", "3"])),
        ],
    );
    for o in out {
        assert!(o.starts_with("done stress"), "{o}");
    }
}

#[test]
fn a_size_that_differs_is_refused_with_einval() {
    let k = kernels();
    k.run(1, &["get", "sized", "8192"]);
    let out = wait(
        k.spawn(2, &["get", "sized", "4096"]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("errno 22") && text.contains("exists with 8192"),
        "{text}"
    );
    let out = wait(
        k.spawn(2, &["get", "bad/name", "4096"]),
        Duration::from_secs(30),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("errno 22"));
}

#[test]
#[ignore]
fn debug_add() {
    let k = kernels();
    let n = std::env::var("N").unwrap_or("100".into());
    let op = std::env::var("OP").unwrap_or("add".into());
    let t = std::time::Instant::now();
    let out = all(
        &k,
        &[
            (0, args(&[&op, "dbg", "8192", &n])),
            (1, args(&[&op, "dbg", "8192", &n])),
            (2, args(&[&op, "dbg", "8192", &n])),
        ],
    );
    eprintln!("{out:?} in {:?}", t.elapsed());
    for a in &k.net.agents {
        eprintln!(
            "{:?}",
            a.facet::<Dsm>()
                .stats()
                .unwrap()
                .regions
                .iter()
                .map(|r| (
                    r.read_faults,
                    r.write_faults,
                    r.requests,
                    r.invalidations,
                    r.latency.mean_us(),
                    r.latency.p99_us()
                ))
                .collect::<Vec<_>>()
        );
    }
}
