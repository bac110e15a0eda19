//! The daemon process: owns the run directory, the shared window and one
//! QEMU process per instance; runs the host's agent (endpoint 0); serves
//! the CLI over the control socket, one thread per connection.
//!
//! Invariants it keeps:
//! - nothing starts before the topology validated;
//! - every QEMU is a child of the daemon's spawner thread with
//!   `PR_SET_PDEATHSIG = SIGKILL`, so no QEMU outlives the daemon, even
//!   when the daemon is killed;
//! - an instance whose QEMU exits or whose agent's heartbeat stops is shown
//!   `failed` with the reason, within a second or two.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use mknode::agent::{Agent, Diag, Hooks, Migration};
use mknode::wire::{ExecRequest, Msg, Stream};

use super::control::{self, DaemonStatus, Frame, InstanceStatus, Reply, Request, Side};
use super::paths::{self, InstanceDir, RunDir};
use super::qmp::Qmp;
use super::window::HostWindow;
use crate::initramfs::Initramfs;
use crate::qemu::cmdline::endpoint_names;
use crate::qemu::{GuestCmdline, MachineSpec, NumaNode, SharedWindow};
use crate::topology::{self, Backend, ImageSpec, Instance, Topology};
use crate::units::{ByteSize, CpuSet, MIB};

/// How often the monitor looks at QEMU processes and heartbeats.
const MONITOR_PERIOD: Duration = Duration::from_millis(250);

/// Lifecycle of one instance, as `mkctl status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Booting,
    Ready,
    Stopping,
    Stopped,
    Failed,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Booting => "booting",
            State::Ready => "ready",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }
}

#[derive(Debug)]
struct Inst {
    name: String,
    id: u16,
    cpus: CpuSet,
    memory: u64,
    state: State,
    reason: Option<String>,
    child: Option<Child>,
    started: Option<Instant>,
    kernel: Option<String>,
    dir: InstanceDir,
}

#[derive(Debug, Default)]
struct Inner {
    config: Option<PathBuf>,
    topology: Option<Topology>,
    instances: BTreeMap<String, Inst>,
}

/// Runs QEMU (and only QEMU) from one long-lived thread, because
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits.
type SpawnReq = (Command, Sender<std::io::Result<Child>>);

#[derive(Debug)]
struct Daemon {
    run: RunDir,
    inner: Mutex<Inner>,
    window: Mutex<Option<Arc<HostWindow>>>,
    spawner: Sender<SpawnReq>,
    stop: AtomicBool,
    /// Taken at start: the executable may be replaced while we run.
    build: String,
}

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot use run directory {}", path.display())]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another daemon (pid {pid}) already serves {}", dir.display())]
    AlreadyRunning { pid: u32, dir: PathBuf },
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Where the host agent's log (the `log` facade) goes: the daemon's
/// stderr, which is its log file in the run directory.
#[derive(Debug)]
struct DaemonLog;

impl log::Log for DaemonLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "mkctl daemon: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

/// `mkctl daemon run`: serves until asked to stop (or SIGTERM/SIGINT),
/// then stops every instance.
pub fn run(run: RunDir) -> Result<(), DaemonError> {
    if log::set_logger(&DaemonLog).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    std::fs::create_dir_all(run.path()).map_err(|source| DaemonError::RunDir {
        path: run.path().into(),
        source,
    })?;
    if let Ok(c) = UnixStream::connect(run.socket()) {
        drop(c);
        let pid = std::fs::read_to_string(run.pid_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        return Err(DaemonError::AlreadyRunning {
            pid,
            dir: run.path().into(),
        });
    }
    let _ = std::fs::remove_file(run.socket());
    let listen_err = |source| DaemonError::Listen {
        path: run.socket(),
        source,
    };
    let listener = UnixListener::bind(run.socket()).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    std::fs::write(run.pid_file(), format!("{}\n", std::process::id())).map_err(|source| {
        DaemonError::RunDir {
            path: run.pid_file(),
            source,
        }
    })?;
    for sig in [
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGINT,
        nix::sys::signal::SIGHUP,
    ] {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_signal),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; no other handler for these signals exists.
        unsafe {
            let _ = nix::sys::signal::sigaction(sig, &action);
        }
    }

    let (spawn_tx, spawn_rx) = bounded::<SpawnReq>(0);
    thread::Builder::new()
        .name("qemu-spawner".into())
        .spawn(move || {
            for (mut cmd, reply) in spawn_rx {
                let _ = reply.send(cmd.spawn());
            }
        })
        .expect("spawning a thread");

    let d = Arc::new(Daemon {
        run: run.clone(),
        inner: Mutex::new(Inner::default()),
        window: Mutex::new(None),
        spawner: spawn_tx,
        stop: AtomicBool::new(false),
        build: control::build_id(),
    });
    eprintln!(
        "mkctl daemon {} serving {}",
        std::process::id(),
        run.socket().display()
    );
    let monitor = {
        let d = Arc::clone(&d);
        thread::spawn(move || d.monitor())
    };
    while !d.stop.load(Ordering::SeqCst) && !SIGNALLED.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let d = Arc::clone(&d);
                thread::spawn(move || d.serve(stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => eprintln!("mkctl daemon: accept: {e}"),
        }
    }
    eprintln!("mkctl daemon: stopping every instance");
    d.stop.store(true, Ordering::SeqCst);
    let names: Vec<String> = d.lock().instances.keys().cloned().collect();
    d.stop_instances(&names, Duration::from_secs(10), &|_, _| {});
    let _ = monitor.join();
    let _ = std::fs::remove_file(run.socket());
    let _ = std::fs::remove_file(run.pid_file());
    if let Some(tree) = run.ram_tree() {
        let _ = std::fs::remove_dir_all(tree);
    }
    Ok(())
}

/// Sends progress lines of one request back to its client.
type Progress<'a> = &'a dyn Fn(&str, &str);

impl Daemon {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn serve(self: Arc<Self>, stream: UnixStream) {
        let mut reader = match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        };
        let writer = Mutex::new(stream);
        let req = match control::read_frame(&mut reader, Side::Daemon) {
            Ok(Frame::Request(r)) => r,
            Ok(_) => return,
            // A client that only checked the daemon is there.
            Err(control::FrameError::Closed) => return,
            Err(e) => {
                eprintln!("mkctl daemon: bad request: {}", crate::error_chain(&e));
                return;
            }
        };
        let send = |r: &Reply| {
            let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = control::send_reply(&mut *w, r);
        };
        let progress = |instance: &str, message: &str| {
            send(&Reply::Progress {
                instance: instance.into(),
                message: message.into(),
            });
        };
        let reply = match req {
            Request::Boot {
                config,
                instances,
                timeout_ms,
            } => self.boot(
                &config,
                &instances,
                Duration::from_millis(timeout_ms),
                &progress,
            ),
            Request::Status => Ok(Reply::Status {
                status: self.status(),
            }),
            Request::Exec {
                instance,
                argv,
                env,
                cwd,
                stdin,
            } => {
                let exec = ExecRequest {
                    argv,
                    env,
                    cwd,
                    stdin,
                };
                match self.exec(&instance, exec, reader, &writer) {
                    Ok(()) => return,
                    Err(e) => Err(e),
                }
            }
            Request::Info { instance } => self.info(&instance),
            Request::Ping { from, to, count } => self.ping(&from, &to, count),
            Request::Traffic {
                from,
                to,
                count,
                size,
            } => self.traffic(&from, &to, count, size),
            Request::Stop {
                instances,
                timeout_ms,
            } => {
                let names = if instances.is_empty() {
                    self.lock().instances.keys().cloned().collect()
                } else {
                    instances
                };
                match self.check_names(&names) {
                    Ok(()) => {
                        // What each was before: only running ones are "stopped".
                        let before: Vec<(String, Option<State>)> = {
                            let inner = self.lock();
                            names
                                .iter()
                                .map(|n| (n.clone(), inner.instances.get(n).map(|i| i.state)))
                                .collect()
                        };
                        self.stop_instances(&names, Duration::from_millis(timeout_ms), &progress);
                        Ok(Reply::Ok {
                            message: stop_summary(&before),
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            Request::Migrate {
                pid,
                from,
                to,
                lazy,
            } => self
                .migrate(pid, &from, &to, lazy, &progress)
                // Failures of the move itself say where they happened.
                .map_err(|(m, code)| match code {
                    1 => (format!("on {from}: {m}"), code),
                    _ => (m, code),
                }),
            Request::Checkpoint { pid, on, kill } => self.checkpoint(pid, &on, kill, &writer),
            Request::Restore { on } => match self.restore(&on, reader, &writer) {
                Ok(()) => return,
                Err(e) => Err(e),
            },
            Request::Shutdown => {
                self.stop.store(true, Ordering::SeqCst);
                Ok(Reply::Ok {
                    message: "the daemon is stopping its instances and exiting".into(),
                })
            }
        };
        send(&reply.unwrap_or_else(|(message, code)| Reply::Error { message, code }));
    }

    fn check_names(&self, names: &[String]) -> Result<(), (String, i32)> {
        let inner = self.lock();
        for n in names {
            if !inner.instances.contains_key(n) {
                let known: Vec<&str> = inner.instances.keys().map(String::as_str).collect();
                return Err((
                    format!(
                        "no instance \"{n}\" in this daemon (it has: {})",
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                    2,
                ));
            }
        }
        Ok(())
    }

    /// Name to endpoint id; "host" is 0.
    fn endpoint_of(&self, name: &str) -> Result<u16, (String, i32)> {
        if name == "host" || name == "0" {
            return Ok(0);
        }
        let inner = self.lock();
        if let Some(i) = inner.instances.get(name) {
            return Ok(i.id);
        }
        if let Some(i) = inner.instances.values().find(|i| i.id.to_string() == name) {
            return Ok(i.id);
        }
        let known: Vec<&str> = inner.instances.keys().map(String::as_str).collect();
        Err((
            format!("no instance \"{name}\" (known: host, {})", known.join(", ")),
            2,
        ))
    }

    fn ready_endpoint(&self, name: &str) -> Result<u16, (String, i32)> {
        let id = self.endpoint_of(name)?;
        if id == 0 {
            return Ok(0);
        }
        let inner = self.lock();
        let inst = inner
            .instances
            .values()
            .find(|i| i.id == id)
            .expect("resolved above");
        if inst.state != State::Ready {
            return Err((
                format!(
                    "instance \"{}\" {}{}",
                    inst.name,
                    match inst.state {
                        State::Failed => "has failed".to_string(),
                        s => format!("is {}", s.as_str()),
                    },
                    inst.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
                1,
            ));
        }
        Ok(id)
    }

    fn agent(&self) -> Result<Arc<Agent>, (String, i32)> {
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|w| Arc::clone(&w.agent))
            .ok_or_else(|| ("no instance was booted yet".to_string(), 1))
    }

    fn boot(
        &self,
        config: &Path,
        only: &[String],
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<Reply, (String, i32)> {
        // Validate first: nothing starts for an invalid topology.
        let t = topology::load(config, || {
            crate::host::HostInfo::discover(Path::new("/"))
                .ok()
                .map(|h| topology::Machine::from_host(&h))
        })
        .map_err(|e| (e.render(), 1))?;
        let config = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
        let selected: Vec<Instance> = if only.is_empty() {
            t.instances.clone()
        } else {
            let mut v = Vec::new();
            for n in only {
                match t.instance(n) {
                    Some(i) => v.push(i.clone()),
                    None => {
                        let names: Vec<&str> =
                            t.instances.iter().map(|i| i.name.as_str()).collect();
                        return Err((
                            format!(
                                "{} has no instance \"{n}\"; it has: {}",
                                config.display(),
                                names.join(", ")
                            ),
                            2,
                        ));
                    }
                }
            }
            v
        };
        if let Some(k) = selected.iter().find(|i| i.backend == Backend::Kexec) {
            return Err((
                format!(
                    "instance \"{}\" uses backend = \"kexec\", which this daemon does not boot; use `mkctl boot` on a multikernel host, or set backend = \"qemu\"",
                    k.name
                ),
                1,
            ));
        }
        let already: Vec<String>;
        {
            let inner = self.lock();
            if let Some(c) = &inner.config {
                let running = inner
                    .instances
                    .values()
                    .any(|i| matches!(i.state, State::Booting | State::Ready | State::Stopping));
                if c != &config && running {
                    return Err((
                        format!(
                            "this daemon runs {}; stop its instances first (mkctl stop --all)",
                            c.display()
                        ),
                        1,
                    ));
                }
            }
            // Booting or stopping: say which and wait. Already ready: left
            // as it is (booting a running topology again is not an error).
            let state_of = |i: &Instance| inner.instances.get(&i.name).map(|o| o.state);
            let busy: Vec<String> = selected
                .iter()
                .filter_map(|i| match state_of(i) {
                    Some(s @ (State::Booting | State::Stopping)) => {
                        Some(format!("{} is {}", i.name, s.as_str()))
                    }
                    _ => None,
                })
                .collect();
            if !busy.is_empty() {
                return Err((
                    format!("{}; wait for it, or stop it first", busy.join(", ")),
                    1,
                ));
            }
            already = selected
                .iter()
                .filter(|i| state_of(i) == Some(State::Ready))
                .map(|i| i.name.clone())
                .collect();
        }
        let selected: Vec<Instance> = selected
            .into_iter()
            .filter(|i| !already.contains(&i.name))
            .collect();
        if selected.is_empty() {
            return Ok(Reply::Ok {
                message: format!("{} already ready", already.join(", ")),
            });
        }
        let kernel_auto = paths::auto_kernel();
        let guest_init = paths::guest_init();
        if let Some(why) = paths::missing_auto_images(&selected) {
            return Err((why, 1));
        }
        let window = self.ensure_window(&t).map_err(|e| (e, 1))?;
        let initramfs = self.run.initramfs();
        if selected.iter().any(|i| i.initrd == ImageSpec::Auto) {
            build_initramfs(&guest_init, &t.files, &initramfs).map_err(|e| (e, 1))?;
        }
        {
            let mut inner = self.lock();
            inner.config = Some(config.clone());
            inner.topology = Some(t.clone());
        }

        // Start every QEMU, then wait for all agents together.
        let mut failures = Vec::new();
        for i in &selected {
            if let Err(e) = self.start_qemu(&t, i, &window, &kernel_auto, &initramfs, progress) {
                progress(&i.name, &format!("failed: {e}"));
                failures.push(format!("{}: {e}", i.name));
            }
        }
        let deadline = Instant::now() + timeout;
        let mut waiting: Vec<&Instance> = selected
            .iter()
            .filter(|i| {
                !failures
                    .iter()
                    .any(|f| f.starts_with(&format!("{}:", i.name)))
            })
            .collect();
        let mut announced: Vec<String> = Vec::new();
        while !waiting.is_empty() {
            waiting.retain(
                |i| match self.check_ready(&window, i, &mut announced, progress) {
                    Ok(true) => false,
                    Ok(false) => true,
                    Err(e) => {
                        progress(&i.name, &format!("failed: {e}"));
                        failures.push(format!("{}: {e}", i.name));
                        false
                    }
                },
            );
            if waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for i in &waiting {
                    let msg = format!(
                        "not ready after {:.0?}; QEMU was killed; {}",
                        timeout,
                        boot_evidence(&self.run.instance(&i.name))
                    );
                    self.fail(&i.name, "boot timed out", true);
                    failures.push(format!("{}: {msg}", i.name));
                }
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        if failures.is_empty() {
            Ok(Reply::Ok {
                message: format!(
                    "{} ready",
                    selected
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
        } else {
            Err((failures.join("\n"), 1))
        }
    }

    /// The window and the host's agent, created at the first boot; the
    /// agent learns the topology's instance names for its messages.
    fn ensure_window(&self, t: &Topology) -> Result<Arc<HostWindow>, String> {
        let hw = self.window_for(t)?;
        hw.agent.name_peers(endpoint_names(t));
        Ok(hw)
    }

    fn window_for(&self, t: &Topology) -> Result<Arc<HostWindow>, String> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = w.as_ref() {
            let need = t.instances.iter().map(|i| i.id.0).max().unwrap_or(0);
            if u32::from(w.endpoints()) <= need {
                return Err(format!(
                    "the running window has endpoints 0-{}, but the topology uses id {need}; stop the daemon (mkctl daemon stop) and boot again",
                    w.endpoints() - 1
                ));
            }
            return Ok(Arc::clone(w));
        }
        let endpoints = t.instances.iter().map(|i| i.id.0).max().unwrap_or(0) + 1;
        let endpoints =
            u16::try_from(endpoints).map_err(|_| "instance ids above 65534".to_string())?;
        let hooks = Hooks {
            power_off: Box::new(|| {}),
            info: Box::new(mknode::agent::kernel_info),
        };
        let agent = Agent::new(0, hooks);
        let hw = HostWindow::create(&self.run.window(), t.window.size.0, endpoints, agent)
            .map_err(|e| {
                format!(
                    "cannot create the window {}: {e}",
                    self.run.window().display()
                )
            })?;
        let hw = Arc::new(hw);
        *w = Some(Arc::clone(&hw));
        Ok(hw)
    }

    fn start_qemu(
        &self,
        t: &Topology,
        i: &Instance,
        window: &HostWindow,
        kernel_auto: &Path,
        initramfs: &Path,
        progress: Progress<'_>,
    ) -> Result<(), String> {
        let id = u16::try_from(i.id.0).map_err(|_| "id out of range".to_string())?;
        let dir = self.run.instance(&i.name);
        let ram = self.run.ram(&i.name);
        for d in [dir.path(), ram.as_path()] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        window
            .reset(id)
            .map_err(|e| format!("cannot reset its channel: {e}"))?;

        let kernel = match &i.kernel {
            ImageSpec::Auto => kernel_auto.to_path_buf(),
            ImageSpec::Path(p) => p.clone(),
        };
        let initrd = match &i.initrd {
            ImageSpec::Auto => initramfs.to_path_buf(),
            ImageSpec::Path(p) => p.clone(),
        };
        let mut spec = MachineSpec::new(
            &i.name,
            &kernel,
            &initrd,
            &GuestCmdline::new(&i.name, i.id)
                .extra(&i.cmdline)
                .peers(endpoint_names(t))
                .to_string(),
            &dir.console_log(),
        );
        spec.qemu = std::env::var_os("MKCTL_QEMU")
            .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from);
        spec.vcpus = u32::try_from(i.cpus.len()).unwrap_or(1);
        spec.memory = i.memory_size();
        spec.numa = guest_numa(t, i);
        spec.ram_dir = Some(ram);
        spec.window = Some(SharedWindow {
            path: self.run.window(),
            size: t.window.size,
        });
        spec.console.socket = Some(dir.console_socket());
        spec.qmp = Some(dir.qmp());
        let mut cmd = spec.command().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(
            std::fs::File::create(dir.path().join("qemu.stderr"))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        );
        // SAFETY: the closure runs in the forked child before exec and
        // only calls prctl(2), which is async-signal-safe; it allocates
        // nothing and touches no lock.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let (tx, rx) = bounded(1);
        self.spawner
            .send((cmd, tx))
            .map_err(|_| "the spawner thread is gone".to_string())?;
        let child = rx
            .recv()
            .map_err(|_| "the spawner thread is gone".to_string())?
            .map_err(|e| format!("cannot start {}: {e}", spec.qemu.display()))?;
        let pid = child.id();
        progress(
            &i.name,
            &format!(
                "qemu pid {pid}, {} vCPU(s), {}",
                spec.vcpus,
                spec.memory.human()
            ),
        );
        {
            let mut inner = self.lock();
            inner.instances.insert(
                i.name.clone(),
                Inst {
                    name: i.name.clone(),
                    id,
                    cpus: i.cpus.clone(),
                    memory: i.memory.size(),
                    state: State::Booting,
                    reason: None,
                    child: Some(child),
                    started: Some(Instant::now()),
                    kernel: None,
                    dir: dir.clone(),
                },
            );
        }
        match pin_vcpus(&dir.qmp(), &i.cpus) {
            Ok(msg) => progress(&i.name, &msg),
            Err(e) => progress(&i.name, &format!("vCPUs not pinned: {e}")),
        }
        Ok(())
    }

    /// True once the instance's agent answered; an error when QEMU died.
    fn check_ready(
        &self,
        window: &HostWindow,
        i: &Instance,
        announced: &mut Vec<String>,
        progress: Progress<'_>,
    ) -> Result<bool, String> {
        let id = u16::try_from(i.id.0).unwrap_or(u16::MAX);
        {
            let mut inner = self.lock();
            let Some(inst) = inner.instances.get_mut(&i.name) else {
                return Err("forgotten".into());
            };
            if let Some(child) = inst.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    inst.state = State::Failed;
                    inst.reason = Some(format!("qemu exited during boot ({status})"));
                    inst.child = None;
                }
            }
            if inst.state == State::Failed {
                return Err(format!(
                    "{}; {}",
                    inst.reason.as_deref().unwrap_or("failed"),
                    boot_evidence(&inst.dir)
                ));
            }
        }
        if !window.peer_alive(id) {
            return Ok(false);
        }
        if !announced.contains(&i.name) {
            progress(&i.name, "agent attached to the window");
            announced.push(i.name.clone());
        }
        match window
            .agent
            .call(id, Duration::from_millis(1500), |req| Msg::InfoRequest {
                req,
            }) {
            Ok(Msg::Info { info, .. }) => {
                let mut inner = self.lock();
                if let Some(inst) = inner.instances.get_mut(&i.name) {
                    inst.state = State::Ready;
                    inst.kernel = Some(info.release.clone());
                    let secs = inst.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                    drop(inner);
                    progress(
                        &i.name,
                        &format!(
                            "ready in {secs:.1} s: {} {}, CPUs {}",
                            info.sysname, info.release, info.cpus_online
                        ),
                    );
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Marks an instance failed; kills its QEMU when asked.
    fn fail(&self, name: &str, reason: &str, kill: bool) {
        let mut inner = self.lock();
        if let Some(inst) = inner.instances.get_mut(name) {
            inst.state = State::Failed;
            inst.reason = Some(reason.to_string());
            if kill {
                if let Some(mut c) = inst.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }

    fn monitor(self: Arc<Self>) {
        while !self.stop.load(Ordering::SeqCst) && !SIGNALLED.load(Ordering::SeqCst) {
            thread::sleep(MONITOR_PERIOD);
            let window = self
                .window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut inner = self.lock();
            for inst in inner.instances.values_mut() {
                if let Some(child) = inst.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        inst.child = None;
                        if inst.state != State::Stopping {
                            inst.state = State::Failed;
                            inst.reason = Some(format!("qemu exited unexpectedly ({status})"));
                            if let Some(w) = &window {
                                w.agent.fail_peer(inst.id, "its QEMU exited");
                            }
                        }
                        continue;
                    }
                }
                if inst.state == State::Ready {
                    if let Some(w) = &window {
                        if let Some(quiet) = w.peer_dead(inst.id) {
                            inst.state = State::Failed;
                            inst.reason = Some(format!(
                                "heartbeat stopped {:.1} s ago",
                                quiet.as_secs_f64()
                            ));
                            w.agent.fail_peer(inst.id, "its heartbeat stopped");
                        }
                    }
                }
            }
        }
    }

    fn status(&self) -> DaemonStatus {
        let window = self
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let inner = self.lock();
        DaemonStatus {
            pid: std::process::id(),
            build: self.build.clone(),
            run_dir: self.run.path().to_path_buf(),
            config: inner.config.clone(),
            window: window.as_ref().map(|_| self.run.window()),
            instances: inner
                .instances
                .values()
                .map(|i| InstanceStatus {
                    name: i.name.clone(),
                    id: u32::from(i.id),
                    state: i.state.as_str().into(),
                    reason: i.reason.clone(),
                    pid: i.child.as_ref().map(Child::id),
                    cpus: i.cpus.to_string(),
                    memory: i.memory,
                    uptime_ms: i
                        .started
                        .filter(|_| matches!(i.state, State::Booting | State::Ready))
                        .map(|s| u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX)),
                    heartbeat_age_ms: window
                        .as_ref()
                        .filter(|_| matches!(i.state, State::Booting | State::Ready))
                        .and_then(|w| w.heartbeat_age(i.id))
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    kernel: i.kernel.clone(),
                })
                .collect(),
        }
    }

    fn info(&self, name: &str) -> Result<Reply, (String, i32)> {
        let id = self.ready_endpoint(name)?;
        let info = if id == 0 {
            mknode::agent::kernel_info()
        } else {
            match self
                .agent()?
                .call(id, Duration::from_secs(5), |req| Msg::InfoRequest { req })
            {
                Ok(Msg::Info { info, .. }) => info,
                Ok(other) => return Err((format!("unexpected answer {other:?}"), 1)),
                Err(e) => return Err((crate::error_chain(&e), 1)),
            }
        };
        Ok(Reply::Info {
            info: serde_json::json!({
                "hostname": info.hostname,
                "sysname": info.sysname,
                "release": info.release,
                "version": info.version,
                "machine": info.machine,
                "cpus_online": info.cpus_online,
                "nodes": info.nodes.iter().map(|n| serde_json::json!({"id": n.id, "cpus": n.cpus, "mem_total": n.mem_total})).collect::<Vec<_>>(),
                "mem_total": info.mem_total,
                "uptime_ms": info.uptime_ms,
            }),
        })
    }

    fn ping(&self, from: &str, to: &str, count: u32) -> Result<Reply, (String, i32)> {
        let a = self.ready_endpoint(from)?;
        let b = self.ready_endpoint(to)?;
        if a == b {
            return Err(("ping needs two different kernels".into(), 2));
        }
        let agent = self.agent()?;
        let count = count.max(1);
        if a == 0 {
            let rtts = agent
                .facet::<Diag>()
                .ping(b, count)
                .map_err(|e| (crate::error_chain(&e), 1))?;
            let mut ns: Vec<u64> = rtts
                .iter()
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .collect();
            ns.sort_unstable();
            return Ok(Reply::Ping {
                count,
                min_ns: ns[0],
                median_ns: ns[ns.len() / 2],
                max_ns: ns[ns.len() - 1],
            });
        }
        let timeout = Duration::from_secs(10) + Duration::from_millis(u64::from(count) * 5);
        match agent.call(a, timeout, |req| Msg::PingPeer {
            req,
            peer: b,
            count,
        }) {
            Ok(Msg::PingReport {
                count,
                rtt_min_ns,
                rtt_median_ns,
                rtt_max_ns,
                ..
            }) => Ok(Reply::Ping {
                count,
                min_ns: rtt_min_ns,
                median_ns: rtt_median_ns,
                max_ns: rtt_max_ns,
            }),
            Ok(other) => Err((format!("unexpected answer {other:?}"), 1)),
            Err(e) => Err((crate::error_chain(&e), 1)),
        }
    }

    fn traffic(&self, from: &str, to: &str, count: u32, size: u32) -> Result<Reply, (String, i32)> {
        let a = self.ready_endpoint(from)?;
        let b = self.ready_endpoint(to)?;
        if a == b {
            return Err(("traffic needs two different kernels".into(), 2));
        }
        let agent = self.agent()?;
        let t0 = Instant::now();
        let seed = u64::from(std::process::id()) ^ t0.elapsed().as_nanos() as u64 ^ 0x5eed;
        let timeout = Duration::from_secs(60);
        if a == 0 {
            agent
                .facet::<Diag>()
                .send_blobs(b, count, size, seed)
                .map_err(|e| (crate::error_chain(&e), 1))?;
        } else {
            match agent.call(a, timeout, |req| Msg::SendBlobs {
                req,
                peer: b,
                count,
                size,
                seed,
            }) {
                Ok(Msg::Done { .. }) => {}
                Ok(other) => return Err((format!("unexpected answer {other:?}"), 1)),
                Err(e) => return Err((crate::error_chain(&e), 1)),
            }
        }
        // The last blobs may still be in the ring: poll the receiver.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (good, bad, next) = if b == 0 {
                let r = agent.facet::<Diag>().blob_report(a);
                (r.good, r.bad, r.next_seq)
            } else {
                match agent.call(b, Duration::from_secs(5), |req| Msg::BlobCheck {
                    req,
                    from: a,
                }) {
                    Ok(Msg::BlobReport {
                        good,
                        bad,
                        next_seq,
                        ..
                    }) => (good, bad, next_seq),
                    Ok(other) => return Err((format!("unexpected answer {other:?}"), 1)),
                    Err(e) => return Err((crate::error_chain(&e), 1)),
                }
            };
            if next >= u64::from(count) || Instant::now() > deadline {
                return Ok(Reply::Traffic {
                    sent: u64::from(count),
                    good,
                    bad,
                    elapsed_ns: u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Relays one command: the agent's answers go to the client as wire
    /// frames; the client's stdin and signals go to the agent.
    fn exec(
        &self,
        name: &str,
        exec: ExecRequest,
        client_rx: UnixStream,
        client_tx: &Mutex<UnixStream>,
    ) -> Result<(), (String, i32)> {
        let id = self.ready_endpoint(name)?;
        if id == 0 {
            return Err(("exec on the host: run the command directly".into(), 2));
        }
        let agent = self.agent()?;
        let (req, rx) = agent
            .request(id, |req| Msg::Exec { req, exec })
            .map_err(|e| (crate::error_chain(&e), 1))?;
        {
            let mut w = client_tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = control::send_reply(&mut *w, &Reply::ExecStarted);
        }
        // Client -> agent: stdin and signals, with the request id rewritten.
        forward_from_client(client_rx, Arc::clone(&agent), id, req, move |m| match m {
            Msg::Data {
                stream: Stream::Stdin,
                bytes,
                ..
            } => Some(Msg::Data {
                req,
                stream: Stream::Stdin,
                bytes,
            }),
            Msg::Eof {
                stream: Stream::Stdin,
                ..
            } => Some(Msg::Eof {
                req,
                stream: Stream::Stdin,
            }),
            _ => None,
        });
        relay_answers(&agent, id, req, &rx, client_tx);
        Ok(())
    }

    fn migrate(
        &self,
        pid: u32,
        from: &str,
        to: &str,
        lazy: bool,
        progress: &dyn Fn(&str, &str),
    ) -> Result<Reply, (String, i32)> {
        let a = self.ready_endpoint(from)?;
        let b = self.ready_endpoint(to)?;
        if a == b {
            return Err((format!("the process is already on {from}"), 2));
        }
        let agent = self.agent()?;
        let running = |new_pid: u32, downtime: Duration| {
            progress(
                to,
                &format!(
                    "running as pid {new_pid} after {:.1} ms of downtime{}",
                    downtime.as_secs_f64() * 1e3,
                    if lazy {
                        "; the remaining pages follow"
                    } else {
                        ""
                    }
                ),
            )
        };
        let report = if a == 0 {
            // The host's agent is the origin: freeze and stream from here
            // (ptrace wants one thread from freeze to kill: this one).
            let r = agent
                .facet::<Migration>()
                .move_out(pid, b, lazy, running)
                .map_err(|e| (crate::error_chain(&e), 1))?;
            (
                r.new_pid,
                r.downtime.as_nanos(),
                r.total.as_nanos(),
                r.image_bytes,
            )
        } else {
            let (req, rx) = agent
                .request(a, |req| Msg::MigrateOut {
                    req,
                    pid,
                    to: b,
                    lazy,
                })
                .map_err(|e| (crate::error_chain(&e), 1))?;
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            let mut running = Some(running);
            let answer = loop {
                match rx.recv_deadline(deadline) {
                    Ok(Msg::MigrateProgress {
                        new_pid,
                        downtime_ns,
                        ..
                    }) => {
                        if let Some(f) = running.take() {
                            f(new_pid, Duration::from_nanos(downtime_ns));
                        }
                    }
                    other => break other,
                }
            };
            agent.forget(a, req);
            match answer {
                Ok(Msg::MigrateReport {
                    new_pid,
                    downtime_ns,
                    total_ns,
                    image_bytes,
                    ..
                }) => (
                    new_pid,
                    u128::from(downtime_ns),
                    u128::from(total_ns),
                    image_bytes,
                ),
                Ok(Msg::Failed { message, .. }) => return Err((message, 1)),
                Ok(other) => return Err((format!("unexpected answer {other:?}"), 1)),
                Err(_) => {
                    return Err((
                        format!("no answer from {from} about the move within 10 min"),
                        1,
                    ))
                }
            }
        };
        Ok(Reply::Migrated {
            new_pid: report.0,
            downtime_ns: u64::try_from(report.1).unwrap_or(u64::MAX),
            total_ns: u64::try_from(report.2).unwrap_or(u64::MAX),
            image_bytes: report.3,
        })
    }

    fn checkpoint(
        &self,
        pid: u32,
        on: &str,
        kill: bool,
        client_tx: &Mutex<UnixStream>,
    ) -> Result<Reply, (String, i32)> {
        let id = self.ready_endpoint(on)?;
        if id == 0 {
            return Err((
                "checkpoint on the host: not supported yet; use an instance".into(),
                2,
            ));
        }
        let agent = self.agent()?;
        let (req, rx) = agent
            .request(id, |req| Msg::Checkpoint { req, pid, kill })
            .map_err(|e| (crate::error_chain(&e), 1))?;
        let result = loop {
            match rx.recv_timeout(Duration::from_secs(600)) {
                Ok(m @ Msg::ImageChunk { .. }) => {
                    let mut w = client_tx.lock().unwrap_or_else(|e| e.into_inner());
                    if control::send_wire(&mut *w, &m).is_err() {
                        break Err(("the client went away".to_string(), 1));
                    }
                }
                Ok(Msg::Done { .. }) => {
                    break Ok(Reply::Ok {
                        message: format!("checkpoint of {pid} on {on} written"),
                    })
                }
                Ok(Msg::Failed { message, .. }) => break Err((message, 1)),
                Ok(_) => {}
                Err(_) => break Err(("no answer from the agent".to_string(), 1)),
            }
        };
        agent.forget(id, req);
        result
    }

    /// Relays an image from the client to an agent that restores it, then
    /// the process's output back, like exec.
    fn restore(
        &self,
        on: &str,
        client_rx: UnixStream,
        client_tx: &Mutex<UnixStream>,
    ) -> Result<(), (String, i32)> {
        let id = self.ready_endpoint(on)?;
        if id == 0 {
            return Err((
                "restore on the host: not supported yet; use an instance".into(),
                2,
            ));
        }
        let agent = self.agent()?;
        let (req, rx) = agent
            .request(id, |req| Msg::RestoreImage { req })
            .map_err(|e| (crate::error_chain(&e), 1))?;
        {
            let mut w = client_tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = control::send_reply(&mut *w, &Reply::ExecStarted);
        }
        // Client -> agent: the image, then signals.
        forward_from_client(client_rx, Arc::clone(&agent), id, req, move |m| match m {
            Msg::ImageChunk { bytes, .. } => Some(Msg::ImageChunk { req, bytes }),
            _ => None,
        });
        relay_answers(&agent, id, req, &rx, client_tx);
        Ok(())
    }

    /// Clean power-off through the agent, then QMP quit, then kill.
    fn stop_instances(&self, names: &[String], timeout: Duration, progress: Progress<'_>) {
        let window = self
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut targets = Vec::new();
        {
            let mut inner = self.lock();
            for n in names {
                if let Some(inst) = inner.instances.get_mut(n) {
                    if inst.child.is_some() {
                        inst.state = State::Stopping;
                        targets.push((n.clone(), inst.id, inst.dir.clone()));
                    } else if inst.state != State::Failed {
                        inst.state = State::Stopped;
                    }
                }
            }
        }
        for (name, id, _) in &targets {
            if let Some(w) = &window {
                if w.agent.send(*id, &Msg::PowerOff).is_ok() {
                    progress(name, "asked the agent to power off");
                }
            }
        }
        let deadline = Instant::now() + timeout;
        let mut quit_sent = false;
        loop {
            let mut left = 0;
            {
                let mut inner = self.lock();
                for (name, _, _) in &targets {
                    let Some(inst) = inner.instances.get_mut(name) else {
                        continue;
                    };
                    if let Some(c) = inst.child.as_mut() {
                        if let Ok(Some(_)) = c.try_wait() {
                            inst.child = None;
                        } else {
                            left += 1;
                        }
                    }
                }
            }
            if left == 0 {
                break;
            }
            let now = Instant::now();
            if now > deadline + Duration::from_secs(3) {
                let mut inner = self.lock();
                for (name, _, _) in &targets {
                    if let Some(inst) = inner.instances.get_mut(name) {
                        if let Some(mut c) = inst.child.take() {
                            progress(name, "killed");
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                    }
                }
                break;
            }
            if now > deadline && !quit_sent {
                quit_sent = true;
                for (name, _, dir) in &targets {
                    if let Ok(mut q) = Qmp::connect(&dir.qmp(), Duration::from_millis(500)) {
                        let _ = q.quit();
                        progress(name, "QMP quit");
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut inner = self.lock();
        for (name, id, _) in &targets {
            if let Some(inst) = inner.instances.get_mut(name) {
                inst.state = State::Stopped;
                inst.started = None;
            }
            if let Some(w) = &window {
                w.agent.fail_peer(*id, "the instance stopped");
            }
            // The RAM files are the instance's memory: gone with it.
            let _ = std::fs::remove_dir_all(self.run.ram(name));
            progress(name, "stopped");
        }
    }
}

/// Forwards what a client sends for request `req` on endpoint `id` (in a
/// thread of its own): what `map` keeps, with the request id rewritten,
/// and signals. A client that goes away takes the process with it
/// (SIGKILL), as a terminal's process group would.
fn forward_from_client(
    mut client_rx: UnixStream,
    agent: Arc<Agent>,
    id: u16,
    req: u32,
    map: impl Fn(Msg) -> Option<Msg> + Send + 'static,
) {
    thread::spawn(move || loop {
        let m = match control::read_frame(&mut client_rx, Side::Daemon) {
            Ok(Frame::Wire(Msg::Signal { signal, .. })) => Msg::Signal { req, signal },
            Ok(Frame::Wire(m)) => match map(m) {
                Some(m) => m,
                None => continue,
            },
            Ok(_) => continue,
            Err(_) => {
                let _ = agent.send(
                    id,
                    &Msg::Signal {
                        req,
                        signal: libc::SIGKILL,
                    },
                );
                return;
            }
        };
        if agent.send(id, &m).is_err() {
            return;
        }
    });
}

/// Copies an agent's answers to one request to the client as wire frames,
/// until the final one (or the client goes away).
fn relay_answers(
    agent: &Agent,
    id: u16,
    req: u32,
    rx: &crossbeam_channel::Receiver<Msg>,
    client_tx: &Mutex<UnixStream>,
) {
    loop {
        let m = rx
            .recv_timeout(Duration::from_secs(3600))
            .unwrap_or(Msg::Failed {
                req,
                message: "no answer from the agent".into(),
            });
        let last = m.is_final();
        let ok = {
            let mut w = client_tx.lock().unwrap_or_else(|e| e.into_inner());
            control::send_wire(&mut *w, &m).is_ok()
        };
        if last || !ok {
            agent.forget(id, req);
            return;
        }
    }
}

/// What `mkctl stop` did: the instances it stopped, and those that were not
/// running (already stopped, or failed) named as such.
fn stop_summary(before: &[(String, Option<State>)]) -> String {
    let (mut stopped, mut others) = (Vec::new(), Vec::new());
    for (name, state) in before {
        match state {
            Some(State::Failed) => others.push(format!("{name} had failed")),
            Some(State::Stopped) | None => others.push(format!("{name} was not running")),
            Some(_) => stopped.push(name.as_str()),
        }
    }
    let mut parts = Vec::new();
    if !stopped.is_empty() {
        parts.push(format!("stopped {}", stopped.join(", ")));
    }
    parts.extend(others);
    parts.join("; ")
}

/// Guest NUMA nodes for an instance: one per machine node its CPUs sit
/// on, each with the vCPUs of those CPUs and a share of the memory in
/// proportion (whole MiB); none when all CPUs sit on one node.
fn guest_numa(t: &Topology, i: &Instance) -> Vec<NumaNode> {
    let nodes = t.machine.nodes_of_cpus(&i.cpus);
    if nodes.len() <= 1 {
        return Vec::new();
    }
    let cpus: Vec<u32> = i.cpus.iter().collect();
    let total_mib = i.memory.size() / MIB;
    let mut out = Vec::new();
    let mut given = 0u64;
    for (k, n) in nodes.iter().enumerate() {
        let vcpus: CpuSet = cpus
            .iter()
            .enumerate()
            .filter(|(_, c)| t.machine.node_of_cpu(**c) == Some(*n))
            .map(|(v, _)| u32::try_from(v).unwrap_or(0))
            .collect::<Vec<_>>()
            .into_iter()
            .fold(CpuSet::new(), |mut s, v| {
                s.insert(v);
                s
            });
        let mib = if k + 1 == nodes.len() {
            total_mib - given
        } else {
            total_mib * vcpus.len() as u64 / cpus.len() as u64
        };
        given += mib;
        out.push(NumaNode {
            cpus: vcpus,
            memory: ByteSize(mib * MIB),
        });
    }
    out
}

/// Pins each vCPU thread to its host CPU: topology CPU `c` runs on host
/// CPU `c mod` the host's CPU count (the demo machine may be larger than
/// the host it is emulated on).
fn pin_vcpus(qmp: &Path, cpus: &CpuSet) -> Result<String, String> {
    let mut q = Qmp::connect(qmp, Duration::from_secs(10)).map_err(|e| crate::error_chain(&e))?;
    let threads = q.vcpu_threads().map_err(|e| crate::error_chain(&e))?;
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    let topo: Vec<u32> = cpus.iter().collect();
    let mut done = Vec::new();
    for t in &threads {
        let Some(&c) = topo.get(t.cpu_index as usize) else {
            continue;
        };
        let h = c as usize % host;
        let mut set = nix::sched::CpuSet::new();
        set.set(h).map_err(|e| e.to_string())?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(t.thread_id), &set)
            .map_err(|e| format!("sched_setaffinity({}): {e}", t.thread_id))?;
        done.push(format!("vCPU {} -> host CPU {h}", t.cpu_index));
    }
    Ok(format!("pinned {}", done.join(", ")))
}

fn build_initramfs(
    guest_init: &Path,
    files: &[(String, PathBuf)],
    out: &Path,
) -> Result<(), String> {
    let mut ir = Initramfs::for_guest(guest_init).map_err(|e| crate::error_chain(&e))?;
    for (guest, host) in files {
        ir.host_file(guest, host, None)
            .map_err(|e| crate::error_chain(&e))?;
    }
    // busybox, when the host has the static one, makes guests useful to
    // poke at: `mkctl exec alpha -- sh`.
    let busybox = Path::new("/bin/busybox");
    if busybox.is_file() && is_static(busybox) {
        ir.host_file("/bin/busybox", busybox, Some(0o755))
            .map_err(|e| crate::error_chain(&e))?;
        for applet in BUSYBOX_APPLETS {
            ir.symlink(&format!("/bin/{applet}"), "busybox")
                .map_err(|e| crate::error_chain(&e))?;
        }
    }
    ir.write_file(out).map_err(|e| crate::error_chain(&e))
}

/// Applets linked into the guest's /bin when busybox is included.
const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "cat",
    "ls",
    "echo",
    "uname",
    "head",
    "tail",
    "dd",
    "sha256sum",
    "md5sum",
    "wc",
    "grep",
    "sleep",
    "ps",
    "free",
    "nproc",
    "mount",
    "dmesg",
    "true",
    "false",
    "env",
    "od",
    "seq",
    "kill",
    "pidof",
    "hostname",
    "tr",
    "sed",
    "rm",
];

fn is_static(path: &Path) -> bool {
    // An ELF with no PT_INTERP is static; read the program headers.
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut h = [0u8; 64];
    if f.read_exact(&mut h).is_err() || &h[..4] != b"\x7fELF" || h[4] != 2 {
        return false;
    }
    let phoff = u64::from_le_bytes(h[32..40].try_into().unwrap_or_default());
    let phentsize = u64::from(u16::from_le_bytes([h[54], h[55]]));
    let phnum = u16::from_le_bytes([h[56], h[57]]);
    for k in 0..u64::from(phnum) {
        let mut p = [0u8; 4];
        if f.seek(SeekFrom::Start(phoff + k * phentsize)).is_err() || f.read_exact(&mut p).is_err()
        {
            return false;
        }
        if u32::from_le_bytes(p) == 3 {
            return false; // PT_INTERP
        }
    }
    true
}

/// What QEMU said on stderr, and the console's last lines.
fn boot_evidence(dir: &InstanceDir) -> String {
    let stderr = std::fs::read_to_string(dir.path().join("qemu.stderr")).unwrap_or_default();
    let mut out = String::new();
    if !stderr.trim().is_empty() {
        out.push_str(&format!("QEMU said: {}\n", stderr.trim()));
    }
    out.push_str(&format!(
        "console tail ({}):\n{}",
        dir.console_log().display(),
        console_tail(&dir.console_log(), 25)
    ));
    out
}

/// The last `n` lines of a console log.
pub fn console_tail(log: &Path, n: usize) -> String {
    let Ok(f) = std::fs::File::open(log) else {
        return format!("(no console log at {})", log.display());
    };
    let lines: Vec<String> = std::io::BufReader::new(f)
        .split(b'\n')
        .map_while(Result::ok)
        .map(|l| {
            String::from_utf8_lossy(&l)
                .trim_end_matches('\r')
                .to_string()
        })
        .collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_names_only_running_instances_as_stopped() {
        let s = |v: &[(&str, Option<State>)]| {
            stop_summary(
                &v.iter()
                    .map(|(n, st)| (n.to_string(), *st))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            s(&[("alpha", Some(State::Failed)), ("beta", Some(State::Ready))]),
            "stopped beta; alpha had failed"
        );
        assert_eq!(
            s(&[
                ("alpha", Some(State::Ready)),
                ("beta", Some(State::Booting))
            ]),
            "stopped alpha, beta"
        );
        assert_eq!(
            s(&[("gamma", Some(State::Stopped))]),
            "gamma was not running"
        );
    }
}
