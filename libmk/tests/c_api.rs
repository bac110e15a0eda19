//! The C API as a program we did not write would use it: `counter.c` built
//! with `cc -static ... libmk.a -lpthread`, exactly as `mk.h` and the
//! README say, run as processes of three agents on the host kernel (each
//! standing for a kernel, linked by a real window in /dev/shm).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mknode::agent::{kernel_info, Agent, Dsm, Hooks};
use mknode::link::RingLink;

/// `<target>/<profile>` of this test binary.
fn target() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// libmk.a (release), built once.
fn libmk_a() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--quiet", "--release", "-p", "libmk"])
            .env("CARGO_TARGET_DIR", target())
            .status()
            .expect("cargo build -p libmk");
        assert!(st.success());
        target().join("release/libmk.a")
    })
}

/// `examples/<name>.c` built against libmk.a, static, as mk.h says.
fn example(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = target().join(format!("{name}-static"));
    let cc = Command::new("cc")
        .arg("-static")
        .arg(dir.join(format!("examples/{name}.c")))
        .arg("-I")
        .arg(dir.join("include"))
        .arg(libmk_a())
        .arg("-lpthread")
        .arg("-o")
        .arg(&out)
        .output()
        .expect("running cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    out
}

/// `counter.c`, built once.
fn counter() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| example("counter"))
}

struct Kernels {
    agents: Vec<Arc<Agent>>,
    stop: Arc<AtomicBool>,
    dir: tempfile::TempDir,
    _window: shmem_ring::Window,
    _endpoints: Vec<shmem_ring::Endpoint>,
}

impl Drop for Kernels {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for a in &self.agents {
            a.facet::<Dsm>().stop_local();
            a.shutdown();
        }
    }
}

fn kernels(n: u16) -> Kernels {
    let dir = tempfile::Builder::new()
        .prefix("libmk")
        .tempdir_in("/dev/shm")
        .expect("tempdir");
    let window =
        shmem_ring::Window::create(dir.path().join("window"), 16 << 20, n).expect("window");
    let stop = Arc::new(AtomicBool::new(false));
    let (mut agents, mut endpoints) = (Vec::new(), Vec::new());
    for id in 0..n {
        let ep = window.attach(id).expect("attach");
        let a = Agent::new(
            id,
            Hooks {
                power_off: Box::new(|| {}),
                info: Box::new(kernel_info),
            },
        );
        for peer in (0..n).filter(|&p| p != id) {
            a.add_link(peer, Arc::new(RingLink::open(&ep, peer).expect("link")));
        }
        let (beat, st) = (ep.heartbeat_handle(), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) && beat.beat().is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        a.facet::<Dsm>()
            .serve_local(&dir.path().join(format!("agent{id}.sock")))
            .expect("local socket");
        agents.push(a);
        endpoints.push(ep);
    }
    Kernels {
        agents,
        stop,
        dir,
        _window: window,
        _endpoints: endpoints,
    }
}

fn run(k: &Kernels, on: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new(counter())
        .args(args)
        .env("MK_AGENT", k.dir.path().join(format!("agent{on}.sock")))
        .stdout(Stdio::piped())
        .output()
        .expect("running counter");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_static_c_program_counts_with_others_on_three_kernels() {
    let k = kernels(3);
    let handles: Vec<_> = (0..3u16)
        .map(|on| {
            let exe = counter().to_path_buf();
            let sock = k.dir.path().join(format!("agent{on}.sock"));
            std::thread::spawn(move || {
                Command::new(exe)
                    .args(["together", "20000"])
                    .env("MK_AGENT", sock)
                    .output()
                    .expect("counter")
            })
        })
        .collect();
    for h in handles {
        let out = h.join().expect("thread");
        assert!(out.status.success(), "{out:?}");
    }
    for on in 0..3 {
        assert_eq!(
            run(&k, on, &["together", "0"]),
            (true, "counter=60000\n".to_string())
        );
    }
}

#[test]
fn failures_come_back_as_null_and_errno() {
    let k = kernels(2);
    // A bad name and a size that differs: EINVAL, as mk.h says.
    let (ok, out) = run(&k, 1, &["bad/name", "1"]);
    assert!(!ok && out.contains("errno 22"), "{out}");
    run(&k, 1, &["sized", "1"]);
    // No agent at the socket: ENOENT.
    let out = Command::new(counter())
        .args(["x", "1"])
        .env("MK_AGENT", "/nonexistent/agent.sock")
        .output()
        .expect("counter");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("errno 2)"), "{text}");
    // mk_migrate with no agent: ECONNREFUSED, not the ENOENT of a kernel
    // that is not linked.
    let out = Command::new(example("threads"))
        .args(["bounce", "2", "1"])
        .env("MK_AGENT", "/nonexistent/agent.sock")
        .output()
        .expect("threads");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains(&format!("errno {})", libc::ECONNREFUSED)),
        "{text}"
    );
    // An empty MK_AGENT counts as unset: the host's run directory is used.
    let run_dir = k.dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::os::unix::fs::symlink(k.dir.path().join("agent0.sock"), run_dir.join("agent.sock"))
        .unwrap();
    let out = Command::new(counter())
        .args(["empty-env", "5"])
        .env("MK_AGENT", "")
        .env("MKCTL_RUN_DIR", &run_dir)
        .output()
        .expect("counter");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
}
