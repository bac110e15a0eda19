//! Agents on the host kernel, linked as kernels are: three agents (a client
//! as endpoint 0, and endpoints 1 and 2; or more, [`net_of`]) over a real shared-memory window
//! in /dev/shm, and `mkcounter` started on one of them through the client's
//! exec stream. Used by the mover tests and the migration bench.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mknode::agent::{kernel_info, Agent, Hooks};
use mknode::link::RingLink;
use mknode::wire::{ExecRequest, ExitStatus, Msg, Stream};

/// The window's size: what `configs/demo.toml` gives its kernels.
pub(crate) const WINDOW: u64 = 16 << 20;

pub(crate) struct Net {
    _dir: tempfile::TempDir,
    /// Keeps the mapping for as long as the agents run.
    _window: shmem_ring::Window,
    pub(crate) agents: Vec<Arc<Agent>>,
    pub(crate) endpoints: Vec<Option<shmem_ring::Endpoint>>,
    /// Set to stop an endpoint's heartbeat (its kernel "dies").
    pub(crate) silenced: Vec<Arc<std::sync::atomic::AtomicBool>>,
}

/// Three agents 0 (client), 1 and 2, all linked.
pub(crate) fn net() -> Net {
    net_where(kernel_info)
}

/// [`net`], with agent 2 describing its kernel through `info2`.
pub(crate) fn net_where(info2: fn() -> mknode::wire::KernelInfo) -> Net {
    net_of(2, |id| if id == 2 { info2 } else { kernel_info })
}

/// `kernels + 1` agents, 0 (client) and 1 to `kernels`, all linked
/// pairwise, each describing its kernel through `info(id)`.
pub(crate) fn net_of(kernels: u16, info: impl Fn(u16) -> fn() -> mknode::wire::KernelInfo) -> Net {
    test_log();
    let n = kernels + 1;
    let dir = tempfile::Builder::new()
        .prefix("mover")
        .tempdir_in("/dev/shm")
        .expect("tempdir in /dev/shm");
    let window = shmem_ring::Window::create(dir.path().join("window"), WINDOW, n).expect("window");
    let mut agents = Vec::new();
    let mut endpoints = Vec::new();
    let mut silenced = Vec::new();
    for id in 0..n {
        let ep = window.attach(id).expect("attach");
        let hooks = Hooks {
            power_off: Box::new(|| {}),
            info: Box::new(info(id)),
        };
        let a = Agent::new(id, hooks);
        for peer in (0..n).filter(|&p| p != id) {
            a.add_link(peer, Arc::new(RingLink::open(&ep, peer).expect("link")));
        }
        let beat = ep.heartbeat_handle();
        let quiet = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let q = Arc::clone(&quiet);
        std::thread::spawn(move || {
            while !q.load(std::sync::atomic::Ordering::Relaxed) && beat.beat().is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        agents.push(a);
        endpoints.push(Some(ep));
        silenced.push(quiet);
    }
    Net {
        _dir: dir,
        _window: window,
        agents,
        endpoints,
        silenced,
    }
}

impl Drop for Net {
    /// Stops the agents' receive threads and the heartbeats, so that tests
    /// making many nets do not leave their threads polling behind them.
    fn drop(&mut self) {
        for (a, q) in self.agents.iter().zip(&self.silenced) {
            a.shutdown();
            q.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Everything an exec stream delivered so far.
pub(crate) struct ExecStream {
    rx: Receiver<Msg>,
    pub(crate) text: String,
    pub(crate) exited: Option<ExitStatus>,
    /// The request's `Failed` answer, if it ended that way.
    pub(crate) failed: Option<String>,
}

impl ExecStream {
    /// Reads until `cond` holds on the text, or fails after `t`.
    pub(crate) fn until(&mut self, t: Duration, cond: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + t;
        while !cond(&self.text) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Msg::Data {
                    stream: Stream::Stdout,
                    bytes,
                    ..
                }) => self.text.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(Msg::Exited { status, .. }) => {
                    self.exited = Some(status);
                    return;
                }
                Ok(Msg::Failed { message, .. }) => {
                    self.failed = Some(message);
                    return;
                }
                Ok(_) => {}
                Err(_) => panic!("timed out; output so far:\n{}", tail(&self.text)),
            }
        }
    }

    pub(crate) fn seqs(&self) -> Vec<u64> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("seq="))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }

    pub(crate) fn checksums(&self) -> Vec<String> {
        self.text
            .lines()
            .filter(|l| l.starts_with("checksum="))
            .map(str::to_string)
            .collect()
    }
}

pub(crate) fn tail(s: &str) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(15)..].join("\n")
}

/// Starts `mkcounter <args>` on agent `on` through the client, waits for
/// its first lines; returns its pid and its output.
pub(crate) fn start(n: &Net, on: u16, args: &[&str]) -> (u32, ExecStream) {
    let mut argv = vec![super::mkcounter().display().to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    start_argv(n, on, argv, |t| t.matches("seq=").count() >= 2)
}

/// Starts `argv` on agent `on` through the client, waits until its output
/// so far satisfies `ready`; returns its pid and its output.
pub(crate) fn start_argv(
    n: &Net,
    on: u16,
    argv: Vec<String>,
    ready: impl Fn(&str) -> bool,
) -> (u32, ExecStream) {
    let exec = ExecRequest {
        argv,
        env: vec![],
        cwd: None,
        stdin: false,
    };
    let (_req, rx) = n.agents[0]
        .request(on, |req| Msg::Exec { req, exec })
        .expect("exec request");
    let pid = match rx.recv_timeout(Duration::from_secs(10)).expect("started") {
        Msg::Started { pid, .. } => pid,
        other => panic!("{other:?}"),
    };
    let mut s = ExecStream {
        rx,
        text: String::new(),
        exited: None,
        failed: None,
    };
    s.until(Duration::from_secs(30), ready);
    (pid, s)
}

/// Three agents 0, 1 and 2 linked pairwise by TCP over loopback (the
/// transport Popcorn used) instead of the shared window; `busy` polls
/// rather than blocking in the kernel.
pub(crate) fn net_tcp(busy: bool) -> Vec<Arc<Agent>> {
    use mknode::link::tcp::{connect, listen, TcpOptions};
    let opts = if busy {
        TcpOptions::default().busy_poll(mknode::link::tcp::DEFAULT_SPIN)
    } else {
        TcpOptions::default()
    };
    let agents: Vec<Arc<Agent>> = (0..3u16)
        .map(|id| {
            Agent::new(
                id,
                Hooks {
                    power_off: Box::new(|| {}),
                    info: Box::new(kernel_info),
                },
            )
        })
        .collect();
    for i in 0..3u16 {
        for j in i + 1..3 {
            let l = listen("127.0.0.1:0".parse().unwrap(), i, opts).expect("listen");
            let addr = l.local_addr().expect("addr");
            let t = std::thread::spawn(move || l.accept().expect("accept"));
            let (pi, to_i) = connect(addr, j, Duration::from_secs(5), opts).expect("connect");
            let (pj, to_j) = t.join().expect("accept thread");
            assert_eq!((pi, pj), (i, j));
            agents[usize::from(j)].add_link(i, Arc::new(to_i));
            agents[usize::from(i)].add_link(j, Arc::new(to_j));
        }
    }
    agents
}

/// The agents' log on stderr, with the time and the thread, when
/// `MKCTL_TEST_LOG` names a level (`debug`, `info`, ...): what a failed
/// long run is diagnosed from.
fn test_log() {
    struct Stderr(Instant);
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            let t = std::thread::current();
            eprintln!(
                "{:10.3} {:5} [{}] {}",
                self.0.elapsed().as_secs_f64(),
                r.level(),
                t.name().unwrap_or("?"),
                r.args()
            );
        }
        fn flush(&self) {}
    }
    static LOG: std::sync::OnceLock<Stderr> = std::sync::OnceLock::new();
    let Some(level) = std::env::var("MKCTL_TEST_LOG")
        .ok()
        .and_then(|l| l.parse::<log::LevelFilter>().ok())
    else {
        return;
    };
    if log::set_logger(LOG.get_or_init(|| Stderr(Instant::now()))).is_ok() {
        log::set_max_level(level);
    }
}

/// Asks agent `at`, through the client (agent 0), to move `pid` to `to`,
/// waiting up to `t` for the report.
pub(crate) fn move_out(
    n: &Net,
    (at, pid): (u16, u32),
    to: u16,
    lazy: bool,
    t: Duration,
) -> Result<Msg, mknode::agent::AgentError> {
    n.agents[0].call(at, t, |req| Msg::MigrateOut {
        req,
        pid,
        to,
        lazy,
        any_cpu: false,
    })
}

/// [`move_out`] of `pid` with all its descendants (`--tree`).
pub(crate) fn move_tree(
    n: &Net,
    (at, pid): (u16, u32),
    (to, lazy): (u16, bool),
    t: Duration,
) -> Result<Msg, mknode::agent::AgentError> {
    n.agents[0].call(at, t, |req| {
        if lazy {
            Msg::MigrateLazyTreeOut {
                req,
                pid,
                to,
                any_cpu: false,
            }
        } else {
            Msg::MigrateTreeOut {
                req,
                pid,
                to,
                any_cpu: false,
            }
        }
    })
}

/// Each thread of this test process (the agents run in it): name, state
/// and the kernel function it waits in, for a failure that is a hang.
#[allow(dead_code)]
pub(crate) fn threads() -> String {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return String::new();
    };
    let read = |t: &std::path::Path, f: &str| {
        std::fs::read_to_string(t.join(f))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let mut v: Vec<String> = dir
        .flatten()
        .map(|e| {
            let t = e.path();
            let stat = read(&t, "stat");
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .unwrap_or("?")
                .to_string();
            format!("{} {} {}", read(&t, "comm"), state, read(&t, "wchan"))
        })
        .collect();
    v.sort();
    v.join("\n")
}

/// Moves `pid` from agent `at` to `to`, checks that the copy prints 10
/// more lines into `out` with no gap, and kills it.
pub(crate) fn move_and_end(
    n: &Net,
    (at, pid): (u16, u32),
    to: u16,
    lazy: bool,
    out: &mut ExecStream,
) {
    let r = move_out(n, (at, pid), to, lazy, Duration::from_secs(60)).expect("moved");
    let Msg::MigrateReport { new_pid, .. } = r else {
        panic!("{r:?}")
    };
    let seen = out.seqs().len();
    out.until(Duration::from_secs(10), |t| {
        t.matches("seq=").count() >= seen + 10
    });
    super::no_gap(&out.seqs());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}
