//! The DSM across agents on the host kernel: three agents linked by a real
//! shared-memory window in /dev/shm (each standing for a kernel), each
//! serving its own processes on its own socket; `dsmtest` processes map
//! one region through different agents and share it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use std::sync::Arc;

use common::agents::{net, Net};
use mknode::agent::{Agent, Dsm};

fn dsmtest() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| common::testprog("dsmtest"))
}

/// The three agents, each serving processes at `<dir>/agent<N>.sock`.
struct Kernels {
    net: Net,
    /// The same over TCP, when the test runs there ([`kernels_tcp`]).
    tcp: Vec<Arc<Agent>>,
    dir: tempfile::TempDir,
}

impl Drop for Kernels {
    fn drop(&mut self) {
        for a in &self.tcp {
            a.facet::<Dsm>().stop_local();
            a.shutdown();
        }
    }
}

fn serve(agents: &[Arc<Agent>], dir: &Path) {
    for (i, a) in agents.iter().enumerate() {
        a.facet::<Dsm>()
            .serve_local(&dir.join(format!("agent{i}.sock")))
            .expect("serving the local socket");
    }
}

fn kernels() -> Kernels {
    let net = net();
    let dir = tempfile::tempdir().expect("tempdir");
    serve(&net.agents, dir.path());
    Kernels {
        net,
        tcp: Vec::new(),
        dir,
    }
}

/// The DSM over TCP links (the window's agents stay idle): the same
/// engine, another transport.
fn kernels_tcp() -> Kernels {
    let dir = tempfile::tempdir().expect("tempdir");
    let tcp = common::agents::net_tcp(false);
    serve(&tcp, dir.path());
    Kernels {
        net: net(),
        tcp,
        dir,
    }
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
    counters(&kernels());
}

#[test]
fn counters_are_exact_over_tcp_too() {
    counters(&kernels_tcp());
}

fn counters(k: &Kernels) {
    const N: u64 = 3000;
    let n = N.to_string();
    all(
        k,
        &[
            (0, args(&["add", "ctr", "12288", &n])),
            (1, args(&["add", "ctr", "12288", &n])),
            (2, args(&["add", "ctr", "12288", &n])),
        ],
    );
    // Under a lock: every acquisition moves the lock's page, so fewer.
    let m = (N / 30).to_string();
    all(
        k,
        &[
            (0, args(&["locked", "ctr", "12288", &m])),
            (1, args(&["locked", "ctr", "12288", &m])),
            (2, args(&["locked", "ctr", "12288", &m])),
        ],
    );
    for on in 0..3 {
        assert_eq!(
            k.run(on, &["get", "ctr", "12288"]).trim(),
            format!("atomic={} locked={}", 3 * N, 3 * (N / 30)),
            "as kernel {on} sees it"
        );
    }
    // Two processes on one kernel share that kernel's copy.
    all(
        k,
        &[
            (1, args(&["add", "ctr", "12288", &n])),
            (1, args(&["add", "ctr", "12288", &n])),
        ],
    );
    assert!(k
        .run(2, &["get", "ctr", "12288"])
        .starts_with(&format!("atomic={}", 5 * N)));
}

#[test]
fn a_consumer_sees_every_record_in_order() {
    // Built before the clock starts (the first test to need it builds it).
    dsmtest();
    for (k, link) in [(kernels(), "ring"), (kernels_tcp(), "TCP")] {
        let t0 = Instant::now();
        all(
            &k,
            &[
                (1, args(&["produce", "pipe", "16384", "300"])),
                (2, args(&["consume", "pipe", "16384", "300"])),
            ],
        );
        // Each record moves pages back and forth, and often meets a page
        // held back for its hold time: a held-back page the engine does not
        // give up when due (it slept through the timer) costs up to 100 ms
        // a record.
        let took = t0.elapsed();
        eprintln!("300 records over {link}: {took:?}");
        assert!(
            took < Duration::from_secs(15),
            "300 records over {link} took {took:?}"
        );
    }
}

#[test]
fn random_reads_and_writes_never_go_back_in_time() {
    stress(&kernels());
}

#[test]
fn random_reads_and_writes_over_tcp() {
    stress(&kernels_tcp());
}

fn stress(k: &Kernels) {
    let out = all(
        k,
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

/// A kernel that goes down takes the pages only it held: a process that
/// then needs one gets SIGBUS within the stated time (the agent declares a
/// peer lost 5 s after its last heartbeat), never a hang or a stale page;
/// a region homed elsewhere goes on working, and the lost one's name can
/// be mapped anew.
#[test]
fn a_lost_home_makes_faults_fail_with_sigbus_and_others_go_on() {
    use std::io::{BufRead, BufReader, Write};
    let k = kernels();
    // Region "lost" is homed on kernel 1 (it maps it first); "kept" on 2.
    k.run(1, &["add", "lost", "16384", "5"]);
    k.run(2, &["add", "kept", "8192", "5"]);
    let mut victim = k.spawn(2, &["touch", "lost", "16384", "3"]);
    let mut out = BufReader::new(victim.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("mapped line");
    assert_eq!(line.trim(), "mapped");

    // Kernel 1 goes down as a killed QEMU does: its agent stops answering
    // and its heartbeat stops.
    for p in [0, 2] {
        k.net.agents[1].remove_link(p);
    }
    k.net.silenced[1].store(true, std::sync::atomic::Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    // Page 3 was never fetched by kernel 2: it needs the lost home.
    victim
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write");
    let status = wait(victim, Duration::from_secs(30)).status;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(12), "{:?}", t0.elapsed());
    // Kernel 2's stats say why.
    let st = k.net.agents[2].facet::<Dsm>().stats().expect("stats");
    let lost = st
        .regions
        .iter()
        .find(|r| r.info.as_ref().is_some_and(|i| i.name == "lost"))
        .expect("region lost");
    assert!(lost.failed >= 1, "{}", lost.failed);
    assert!(
        lost.error
            .as_deref()
            .is_some_and(|e| e.contains("home is lost")),
        "{:?}",
        lost.error
    );
    // A region homed on a live kernel goes on: kernels 0 and 2 share it.
    k.run(0, &["add", "kept", "8192", "100"]);
    assert!(k.run(2, &["get", "kept", "8192"]).starts_with("atomic=105"));
    // The lost one's name is free again once the registry (kernel 0) has
    // taken its home as lost too (each kernel decides on its own, within
    // the same peer-loss time): mapped anew, zero-filled, homed where it is
    // first mapped now.
    let t = std::time::Instant::now();
    while k.net.agents[0].lost(1).is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "kernel 0 never lost 1"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    k.run(2, &["add", "lost", "16384", "7"]);
    assert!(k.run(0, &["get", "lost", "16384"]).starts_with("atomic=7"));
    assert!(k.run(2, &["get", "lost", "16384"]).starts_with("atomic=7"));
    // Homed at the registry's kernel, too.
    k.run(0, &["add", "lost2", "8192", "1"]);
    k.run(0, &["add", "lost2", "8192", "1"]);
    assert!(k.run(0, &["get", "lost2", "8192"]).starts_with("atomic=2"));
}
