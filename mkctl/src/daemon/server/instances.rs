//! The lifecycle of the daemon's instances: boot (validate, window, one
//! initramfs per stock kernel with that kernel's modules, one QEMU each,
//! wait for every agent), stop (agent power-off, then QMP quit, then
//! kill), restart (a stop, then a boot), the monitor that notices QEMU
//! exits and lost heartbeats and carries out the restart policy (through
//! the same restart), and status. Which transitions are allowed is
//! [`crate::daemon::state`]'s to say; this file carries them out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mknode::agent::{Agent, Hooks};
use mknode::wire::Msg;

use super::{Daemon, Progress};
use crate::daemon::control::{DaemonStatus, InstanceStatus, Reply};
use crate::daemon::error::{InstanceError, RequestError};
use crate::daemon::paths::{self, InstanceDir};
use crate::daemon::process::Qemu;
use crate::daemon::qmp::Qmp;
use crate::daemon::state::{
    stop_summary, Inst, PolicyState, PolicyStep, StartedBy, State, StopStep, Stopped,
};
use crate::daemon::window::HostWindow;
use crate::initramfs::Initramfs;
use crate::qemu::cmdline::endpoint_names;
use crate::qemu::{guest_numa, GuestCmdline, MachineSpec, SharedWindow};
use crate::topology::{self, Backend, ImageSpec, Instance, KernelSeries, Topology};
use crate::units::CpuSet;

/// How often the monitor looks at QEMU processes and heartbeats.
const MONITOR_PERIOD: Duration = Duration::from_millis(250);
/// How long a guest's heartbeat must have stopped before the instance is
/// `failed`: as long as its agents wait before they call a peer lost (the
/// ring's 2 s, then 3 s more): a TCG guest starved of CPU on a loaded host
/// goes quiet for seconds and comes back (seen: 2.0 s under load ~6).
const HUNG_AFTER: Duration = Duration::from_secs(5);
/// How long a stop waits after QMP quit before it kills a QEMU.
const KILL_AFTER_QUIT: Duration = Duration::from_secs(3);
/// The restart policy's stop: the instance failed, so its agent is not
/// waited for long (a hung guest still has a QEMU that QMP can quit).
const POLICY_STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// The restart policy's boot: as long as `mkctl restart` waits by default.
const POLICY_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The topology of `config`, validated against this host, its canonical
/// path, and its instances that `only` names (all of them when empty; a
/// name it does not have is refused, naming those it has).
pub(super) fn load_topology(
    config: &Path,
    only: &[String],
) -> Result<(Topology, PathBuf, Vec<Instance>), RequestError> {
    let t = topology::load(config, || {
        crate::host::HostInfo::discover(Path::new("/"))
            .ok()
            .map(|h| topology::Machine::from_host(&h))
    })
    .map_err(RequestError::Topology)?;
    let config = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    if let Some(n) = only.iter().find(|n| t.instance(n).is_none()) {
        return Err(RequestError::NotInTopology {
            config,
            name: n.clone(),
            known: t
                .instances
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let selected = t
        .instances
        .iter()
        .filter(|i| only.is_empty() || only.contains(&i.name))
        .cloned()
        .collect();
    Ok((t, config, selected))
}

impl Daemon {
    pub(super) fn boot(
        &self,
        config: &Path,
        only: &[String],
        timeout: Duration,
        by: StartedBy,
        progress: Progress<'_>,
    ) -> Result<Reply, RequestError> {
        // Validate first: nothing starts for an invalid topology.
        let (t, config, selected) = load_topology(config, only)?;
        if let Some(k) = selected.iter().find(|i| i.backend == Backend::Kexec) {
            return Err(RequestError::KexecInstance {
                name: k.name.clone(),
            });
        }
        self.notice(false);
        let (selected, already) = self.registry().admit_boot(&config, selected)?;
        if selected.is_empty() {
            return Ok(Reply::Ok {
                message: format!("{} already ready", already.join(", ")),
            });
        }
        if let Some(why) = paths::missing_auto_images(&selected) {
            return Err(RequestError::MissingImages(why));
        }
        let window = self.ensure_window(&t)?;
        // One initramfs per stock kernel the guests with initrd = "auto"
        // run, each with the modules built for that kernel (the doorbell
        // port's driver, unix_diag): a module loads only in its own
        // release. Guests of a kernel given by path get the default
        // kernel's (they fail to load there and those guests poll).
        let mut initramfs: BTreeMap<Option<KernelSeries>, PathBuf> = BTreeMap::new();
        for i in selected.iter().filter(|i| i.initrd == ImageSpec::Auto) {
            let series = i.kernel.series();
            if initramfs.contains_key(&series) {
                continue;
            }
            let (out, modules) = match series {
                None => (self.run.initramfs(), paths::auto_kernel_modules()),
                Some(k) => (
                    self.run.series_initramfs(k),
                    paths::series_kernel_modules(k),
                ),
            };
            let mut ir = Initramfs::for_topology(&paths::guest_init(), &t.files)?;
            if window.relay().is_some() {
                ir.kernel_modules(&modules)?;
            }
            ir.write_file(&out)?;
            initramfs.insert(series, out);
        }
        {
            let mut reg = self.registry();
            reg.config = Some(config.clone());
            reg.names = endpoint_names(&t);
        }

        // Start every QEMU, then wait for all agents together.
        let mut failures: Vec<(String, InstanceError)> = Vec::new();
        let mut waiting: Vec<&Instance> = Vec::new();
        for i in &selected {
            if let Some(inst) = self.registry().instances.get_mut(&i.name) {
                inst.policy = PolicyState::for_boot(Some(&inst.policy), by);
            }
            let kernel = match &i.kernel {
                ImageSpec::Auto => paths::auto_kernel(),
                ImageSpec::AutoSeries(k) => paths::series_kernel(*k),
                ImageSpec::Path(p) => p.clone(),
            };
            let initrd = match &i.initrd {
                ImageSpec::Path(p) => p.clone(),
                // Validation gives initrd no series: "auto".
                ImageSpec::Auto | ImageSpec::AutoSeries(_) => initramfs
                    .get(&i.kernel.series())
                    .cloned()
                    .unwrap_or_else(|| self.run.initramfs()),
            };
            match self.start_qemu(&t, i, &window, &kernel, &initrd, progress) {
                Ok(()) => waiting.push(i),
                Err(e) => {
                    progress(&i.name, &format!("failed: {}", crate::error_chain(&e)));
                    failures.push((i.name.clone(), e));
                }
            }
        }
        let deadline = Instant::now() + timeout;
        let mut announced: Vec<String> = Vec::new();
        while !waiting.is_empty() {
            waiting.retain(
                |i| match self.check_ready(&window, i, &mut announced, progress) {
                    Ok(true) => false,
                    Ok(false) => true,
                    Err(e) => {
                        progress(&i.name, &format!("failed: {}", crate::error_chain(&e)));
                        failures.push((i.name.clone(), e));
                        false
                    }
                },
            );
            if waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for i in &waiting {
                    let evidence = self.run.instance(&i.name).boot_evidence();
                    self.fail(&i.name, "boot timed out", true);
                    failures.push((i.name.clone(), InstanceError::Timeout { timeout, evidence }));
                }
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        if !failures.is_empty() {
            return Err(RequestError::Boot(failures));
        }
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
    }

    /// The window and the host's agent, created at the first boot; the
    /// agent learns the topology's instance names for its messages.
    fn ensure_window(&self, t: &Topology) -> Result<Arc<HostWindow>, RequestError> {
        let hw = self.window_for(t)?;
        hw.agent.name_peers(endpoint_names(t));
        Ok(hw)
    }

    fn window_for(&self, t: &Topology) -> Result<Arc<HostWindow>, RequestError> {
        let need = t.instances.iter().map(|i| i.id.0).max().unwrap_or(0);
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = w.as_ref() {
            if w.phys().is_some() {
                return Err(RequestError::OtherWindow {
                    running: w.place().to_string(),
                    wanted: format!("a file for QEMU guests, {}", self.run.window().display()),
                });
            }
            if u32::from(w.endpoints()) <= need {
                return Err(RequestError::WindowTooSmall {
                    endpoints: w.endpoints(),
                    need,
                });
            }
            return Ok(Arc::clone(w));
        }
        let endpoints = u16::try_from(need + 1).map_err(|_| RequestError::TooManyEndpoints)?;
        let hw = self.host_agent(|agent| {
            HostWindow::create(&self.run.window(), t.window.size.0, endpoints, agent)
        })?;
        *w = Some(Arc::clone(&hw));
        Ok(hw)
    }

    /// The host's agent (endpoint 0) on the window `attach` creates or
    /// opens, serving the host's processes' DSM on the run directory's
    /// agent socket.
    pub(super) fn host_agent(
        &self,
        attach: impl FnOnce(Arc<Agent>) -> Result<HostWindow, crate::daemon::window::WindowError>,
    ) -> Result<Arc<HostWindow>, RequestError> {
        let hooks = Hooks {
            power_off: Box::new(|| {}),
            info: Box::new(mknode::agent::kernel_info),
        };
        let agent = Agent::new(0, hooks);
        let hw = Arc::new(attach(Arc::clone(&agent))?);
        // The host's processes reach the DSM here.
        agent
            .facet::<mknode::agent::Dsm>()
            .serve_local(&self.run.agent_socket())?;
        Ok(hw)
    }

    /// The host agent, once a window exists.
    pub(super) fn agent(&self) -> Result<Arc<Agent>, RequestError> {
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|w| Arc::clone(&w.agent))
            .ok_or(RequestError::NoWindow)
    }

    fn start_qemu(
        &self,
        t: &Topology,
        i: &Instance,
        window: &HostWindow,
        kernel: &Path,
        initrd: &Path,
        progress: Progress<'_>,
    ) -> Result<(), InstanceError> {
        let id = u16::try_from(i.id.0).map_err(|_| InstanceError::Id(i.id.0))?;
        // A failed instance may still have a QEMU (its guest hung): gone
        // before its channel is reset and a new one starts.
        let left = self
            .registry()
            .instances
            .get_mut(&i.name)
            .and_then(|inst| inst.child.take());
        if let Some(mut old) = left {
            progress(
                &i.name,
                &format!("killed the QEMU (pid {}) of its failed run", old.id()),
            );
            old.kill();
        }
        let dir = self.run.instance(&i.name);
        let ram = self.run.ram(&i.name);
        for d in [dir.path(), ram.as_path()] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).map_err(|source| InstanceError::Dir {
                path: d.to_path_buf(),
                source,
            })?;
        }
        window.reset(id).map_err(InstanceError::Channel)?;

        let mut spec = MachineSpec::new(
            &i.name,
            kernel,
            initrd,
            &GuestCmdline::new(&i.name, i.id)
                .extra(&i.cmdline)
                .peers(endpoint_names(t))
                .to_string(),
            &dir.console_log(),
        );
        spec.qemu = std::env::var_os("MKCTL_QEMU")
            .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from);
        spec.cpu_off = crate::qemu::flags_the_host_lacks(&mknode::migrate::cpu::user_features());
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
        spec.doorbell = window.relay().map(|_| dir.doorbell());
        let mut cmd = spec.command()?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(
            std::fs::File::create(dir.qemu_stderr())
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        );
        // No parent-death signal: a QEMU outlives a daemon that is killed,
        // for the next one to adopt.
        let child = Qemu::spawned(cmd.spawn().map_err(|source| InstanceError::Spawn {
            qemu: spec.qemu.clone(),
            source,
        })?);
        let pid = child.id();
        if let (Some(relay), Some(sock)) = (window.relay(), &spec.doorbell) {
            if let Err(e) = relay.attach(id, sock) {
                progress(
                    &i.name,
                    &format!("no doorbell relay, its receivers poll: {e}"),
                );
            }
        }
        progress(
            &i.name,
            &format!(
                "qemu pid {pid}, {} vCPU(s), {}",
                spec.vcpus,
                spec.memory.human()
            ),
        );
        let mut reg = self.registry();
        // What the restart policy knows of it (set by `boot` for this boot).
        let policy = reg
            .instances
            .get(&i.name)
            .map(|p| p.policy.clone())
            .unwrap_or_default();
        reg.instances.insert(
            i.name.clone(),
            Inst {
                child: Some(child),
                policy,
                ..Inst::booting(i, id, dir.clone())
            },
        );
        drop(reg);
        match pin_vcpus(&dir.qmp(), &i.cpus) {
            Ok(msg) => progress(&i.name, &msg),
            Err(e) => progress(
                &i.name,
                &format!("vCPUs not pinned: {}", crate::error_chain(&e)),
            ),
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
    ) -> Result<bool, InstanceError> {
        let id = u16::try_from(i.id.0).unwrap_or(u16::MAX);
        self.agent_ready(window, &i.name, id, announced, progress)
    }

    /// True once the agent of instance `name` (endpoint `id`) answered and
    /// it is `ready`; an error when it failed meanwhile (its QEMU died).
    pub(super) fn agent_ready(
        &self,
        window: &HostWindow,
        name: &str,
        id: u16,
        announced: &mut Vec<String>,
        progress: Progress<'_>,
    ) -> Result<bool, InstanceError> {
        {
            let mut reg = self.registry();
            let Some(inst) = reg.instances.get_mut(name) else {
                return Err(InstanceError::Died {
                    reason: "forgotten".into(),
                    evidence: String::new(),
                });
            };
            if let Some(status) = inst.child.as_mut().and_then(Qemu::try_wait) {
                inst.fail(format!("qemu exited during boot ({status})"));
                inst.child = None;
            }
            if inst.state == State::Failed {
                return Err(InstanceError::Died {
                    reason: inst.reason.clone().unwrap_or_else(|| "failed".into()),
                    evidence: inst.dir.boot_evidence(),
                });
            }
        }
        if !window.peer_alive(id) {
            return Ok(false);
        }
        if !announced.iter().any(|a| a == name) {
            progress(name, "agent attached to the window");
            announced.push(name.to_string());
        }
        let Ok(Msg::Info { info, .. }) =
            window
                .agent
                .call(id, Duration::from_millis(1500), |req| Msg::InfoRequest {
                    req,
                })
        else {
            return Ok(false);
        };
        let mut reg = self.registry();
        // Only a boot still under way becomes ready: a stop (or a failure)
        // that came meanwhile stands.
        if let Some(inst) = reg
            .instances
            .get_mut(name)
            .filter(|inst| inst.state == State::Booting)
        {
            inst.state = State::Ready;
            // From now on a failure is the restart policy's to act on.
            inst.policy.armed = true;
            inst.kernel = Some(info.release.clone());
            let secs = inst.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            drop(reg);
            progress(
                name,
                &format!(
                    "ready in {secs:.1} s: {} {}, CPUs {}",
                    info.sysname, info.release, info.cpus_online
                ),
            );
            return Ok(true);
        }
        let now = reg
            .instances
            .get(name)
            .map_or("forgotten", |inst| inst.state.as_str());
        Err(InstanceError::Died {
            reason: format!("it became {now} while it booted"),
            evidence: String::new(),
        })
    }

    /// Marks an instance failed; kills its QEMU when asked.
    pub(super) fn fail(&self, name: &str, reason: &str, kill: bool) {
        let mut reg = self.registry();
        if let Some(inst) = reg.instances.get_mut(name) {
            inst.fail(reason);
            if kill {
                if let Some(mut c) = inst.child.take() {
                    c.kill();
                }
            }
        }
    }

    pub(super) fn monitor(self: Arc<Self>) {
        while !self.stopping() {
            thread::sleep(MONITOR_PERIOD);
            self.notice(true);
            self.apply_restart_policies();
        }
    }

    /// The restart policy's step for every instance (see
    /// [`Inst::policy_step`]): schedules a restart of what just failed,
    /// says when the limit is reached, and starts each restart that is due
    /// on a thread of its own, so the monitor keeps watching the others.
    fn apply_restart_policies(self: &Arc<Self>) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut reg = self.registry();
            for inst in reg.instances.values_mut() {
                match inst.policy_step(now) {
                    PolicyStep::Idle => {}
                    PolicyStep::Scheduled {
                        attempt,
                        limit,
                        after,
                    } => log::warn!(
                        "{}: {}; restart {attempt} of {limit} in {:.0} s (restart = \"on-failure\")",
                        inst.name,
                        inst.reason.as_deref().unwrap_or_default(),
                        after.as_secs_f64()
                    ),
                    PolicyStep::GaveUp { .. } => log::error!(
                        "{}: {}; it stays failed until `mkctl restart {}`",
                        inst.name,
                        inst.reason.as_deref().unwrap_or_default(),
                        inst.name
                    ),
                    PolicyStep::RestartNow { attempt, limit } => {
                        due.push((inst.name.clone(), attempt, limit));
                    }
                }
            }
        }
        if self.stopping() {
            return;
        }
        for (name, attempt, limit) in due {
            let d = Arc::clone(self);
            let n = name.clone();
            let spawned = thread::Builder::new()
                .name(format!("restart-{name}"))
                .spawn(move || d.restart_by_policy(&n, attempt, limit));
            if let Err(e) = spawned {
                log::error!("{name}: cannot start restart {attempt} of {limit}: {e}");
                if let Some(inst) = self.registry().instances.get_mut(&name) {
                    inst.policy.running = false;
                }
            }
        }
    }

    /// Restart number `attempt` of `limit` of a failed instance, by its
    /// policy: [`Daemon::restart`], as `mkctl restart` does it, with its
    /// progress in the daemon's log.
    fn restart_by_policy(&self, name: &str, attempt: u32, limit: u32) {
        if self.stopping() {
            return;
        }
        log::info!("{name}: restart {attempt} of {limit} (restart = \"on-failure\")");
        let progress = |instance: &str, message: &str| log::info!("{instance}: {message}");
        let result = self.restart(
            vec![name.to_string()],
            POLICY_STOP_TIMEOUT,
            POLICY_BOOT_TIMEOUT,
            StartedBy::Policy,
            &progress,
        );
        let mut reg = self.registry();
        let Some(inst) = reg.instances.get_mut(name) else {
            return;
        };
        inst.policy.running = false;
        match result {
            Ok(Reply::Ok { message }) => log::info!("{name}: {message}"),
            Ok(_) => {}
            Err(e) => {
                let why = crate::error_chain(&e);
                log::warn!("{name}: restart {attempt} of {limit} failed: {why}");
                // Nothing was booted (the topology, say, is now invalid):
                // say why in its status. A failed boot has its own reason.
                if inst.state == State::Failed && !matches!(e, RequestError::Boot(_)) {
                    inst.reason = Some(format!("restart {attempt} of {limit} failed: {why}"));
                }
            }
        }
    }

    /// Marks `failed` every instance whose QEMU exited unexpectedly and,
    /// with `heartbeats`, every one whose heartbeat stopped for
    /// [`HUNG_AFTER`]. The monitor does this every [`MONITOR_PERIOD`]; a
    /// boot does it first, so a guest whose QEMU was just killed is booted
    /// again instead of called "already ready".
    pub(super) fn notice(&self, heartbeats: bool) {
        let window = self
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut reg = self.registry();
        for inst in reg.instances.values_mut() {
            // A kexec instance has no QEMU: its agent letting go of the
            // window is the end of it (a power-off inside, or a stop).
            if inst.kexec
                && inst.state == State::Ready
                && window.as_ref().is_some_and(|w| w.peer_left(inst.id))
            {
                log::info!(
                    "{}: its agent left the window (powered off from inside the kernel)",
                    inst.name
                );
                inst.state = State::Stopped;
                inst.started = None;
                if let Some(w) = &window {
                    w.agent.fail_peer(inst.id, "its agent left the window");
                }
                continue;
            }
            if let Some(child) = inst.child.as_mut() {
                if let Some(status) = child.try_wait() {
                    inst.child = None;
                    if inst.state.on_process_exit() == State::Failed {
                        // Its agent let go of the window before the end: a
                        // power-off asked for inside the guest (`poweroff`,
                        // `reboot`), which is a stop, not a failure.
                        if window.as_ref().is_some_and(|w| w.peer_left(inst.id)) {
                            log::info!(
                                "{}: powered off from inside the guest (its agent left the window; qemu {status})",
                                inst.name
                            );
                            inst.state = State::Stopped;
                            inst.started = None;
                            inst.policy.armed = false;
                        } else {
                            inst.fail(format!("qemu exited unexpectedly ({status})"));
                        }
                        if let Some(w) = &window {
                            w.agent.fail_peer(inst.id, "its QEMU exited");
                        }
                    }
                    continue;
                }
            }
            if heartbeats && inst.state.on_heartbeat_lost() != inst.state {
                if let Some(quiet) = window
                    .as_ref()
                    .and_then(|w| w.peer_dead(inst.id))
                    .filter(|q| *q >= HUNG_AFTER)
                {
                    inst.fail(format!(
                        "heartbeat stopped {:.1} s ago",
                        quiet.as_secs_f64()
                    ));
                    if let Some(w) = &window {
                        w.agent.fail_peer(inst.id, "its heartbeat stopped");
                    }
                }
            }
        }
    }

    pub(super) fn status(&self) -> DaemonStatus {
        let window = self
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let reg = self.registry();
        DaemonStatus {
            pid: std::process::id(),
            build: self.build.clone(),
            run_dir: self.run.path().to_path_buf(),
            config: reg.config.clone(),
            window: window.as_ref().map(|w| PathBuf::from(w.place())),
            doorbell: window.as_ref().and_then(|w| w.relay()).map(|r| r.stats()),
            instances: reg
                .instances
                .values()
                .map(|i| InstanceStatus {
                    name: i.name.clone(),
                    id: u32::from(i.id),
                    state: i.state.as_str().into(),
                    reason: i.reason.clone(),
                    pid: i.child.as_ref().map(Qemu::id),
                    adopted: i.kexec_adopted || i.child.as_ref().is_some_and(Qemu::adopted),
                    cpus: i.cpus.to_string(),
                    memory: i.memory,
                    uptime_ms: i
                        .started
                        .filter(|_| i.state.is_live())
                        .map(|s| u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX)),
                    heartbeat_age_ms: window
                        .as_ref()
                        .filter(|_| i.state.is_live())
                        .and_then(|w| w.heartbeat_age(i.id))
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    kernel: i.kernel.clone(),
                    restart: i.restart.as_str().into(),
                    restart_limit: i.restart.limit(),
                    restarts: i.policy.restarts,
                })
                .collect(),
        }
    }

    /// `mkctl stop`: stops `names` (every instance when empty), all of
    /// which must be this daemon's; returns what happened to each.
    pub(super) fn stop(
        &self,
        names: Vec<String>,
        timeout: Duration,
        force: bool,
        progress: Progress<'_>,
    ) -> Result<Vec<Stopped>, RequestError> {
        let names = if names.is_empty() {
            self.registry().instances.keys().cloned().collect()
        } else {
            names
        };
        self.registry().check_names(&names)?;
        Ok(self.stop_instances(&names, timeout, force, progress))
    }

    /// `mkctl restart`, and the restart policy's restarts (`by`):
    /// [`Daemon::stop`], then [`Daemon::boot`] of the same
    /// instances from the topology this daemon runs (read again, so an
    /// edited instance comes back as the file now says). A failed instance
    /// is booted again too; an unknown name stops nothing.
    pub(super) fn restart(
        &self,
        names: Vec<String>,
        stop_timeout: Duration,
        boot_timeout: Duration,
        by: StartedBy,
        progress: Progress<'_>,
    ) -> Result<Reply, RequestError> {
        let names = if names.is_empty() {
            self.registry().instances.keys().cloned().collect()
        } else {
            names
        };
        let config = {
            let reg = self.registry();
            reg.check_names(&names)?;
            reg.config.clone().ok_or(RequestError::NoWindow)?
        };
        let stopped = stop_summary(&self.stop(names.clone(), stop_timeout, false, progress)?);
        let booted = match self.boot(&config, &names, boot_timeout, by, progress)? {
            Reply::Ok { message } => message,
            other => return Ok(other),
        };
        Ok(Reply::Ok {
            message: format!("restarted {}: {stopped}; {booted}", names.join(", ")),
        })
    }

    /// Stops QEMU instances, escalating: a clean power-off through the
    /// agent; after `timeout` (at once with `force`, which skips the agent)
    /// QMP quit; 3 s later a kill. Returns each instance's state before and
    /// the step that ended its QEMU.
    pub(super) fn stop_instances(
        &self,
        names: &[String],
        timeout: Duration,
        force: bool,
        progress: Progress<'_>,
    ) -> Vec<Stopped> {
        let window = self
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let t0 = Instant::now();
        let (targets, mut outcomes) = self.registry().begin_stop(names);
        // The first step seen to end it counts.
        let mut ended = |name: &str, step: StopStep| {
            if let Some(o) = outcomes
                .iter_mut()
                .find(|o| o.name == name && o.step.is_none())
            {
                o.step = Some((step, t0.elapsed()));
            }
        };
        let timeout = if force { Duration::ZERO } else { timeout };
        if !force {
            for (name, id, _) in &targets {
                if let Some(w) = &window {
                    if w.agent.send(*id, &Msg::PowerOff).is_ok() {
                        progress(name, "asked the agent to power off");
                    }
                }
            }
        }
        let deadline = t0 + timeout;
        let mut quit_sent = false;
        loop {
            let mut left = 0;
            {
                let mut reg = self.registry();
                for (name, _, _) in &targets {
                    let Some(inst) = reg.instances.get_mut(name) else {
                        continue;
                    };
                    let exited = match inst.child.as_mut() {
                        Some(c) => c.try_wait().is_some(),
                        // A kexec instance ends when its agent lets go of
                        // the window (or stops beating).
                        None if inst.kexec => {
                            !window.as_ref().is_some_and(|w| w.peer_attached(inst.id))
                        }
                        // The monitor reaped it (it leaves the state of a
                        // stopping instance to the stop).
                        None => true,
                    };
                    if exited {
                        inst.child = None;
                        ended(
                            name,
                            if quit_sent {
                                StopStep::QmpQuit
                            } else {
                                StopStep::Agent
                            },
                        );
                    } else {
                        left += 1;
                    }
                }
            }
            if left == 0 {
                break;
            }
            let now = Instant::now();
            if now > deadline + KILL_AFTER_QUIT {
                let mut reg = self.registry();
                for (name, _, _) in &targets {
                    if let Some(inst) = reg.instances.get_mut(name) {
                        if let Some(mut c) = inst.child.take() {
                            progress(
                                name,
                                &format!(
                                    "still running {:.0} s after QMP quit: killed",
                                    KILL_AFTER_QUIT.as_secs_f64()
                                ),
                            );
                            c.kill();
                            ended(name, StopStep::Kill);
                        }
                    }
                }
                break;
            }
            if now >= deadline && !quit_sent {
                quit_sent = true;
                // Not under the registry's lock: QMP of a frozen QEMU
                // answers only at its read timeout, and the monitor, status
                // and every other request must not wait for it.
                let running: Vec<&(String, u16, InstanceDir)> = {
                    let reg = self.registry();
                    targets
                        .iter()
                        .filter(|(name, _, _)| {
                            reg.instances.get(name).is_some_and(|i| i.child.is_some())
                        })
                        .collect()
                };
                for (name, _, dir) in running {
                    let why = if force {
                        "--force".to_string()
                    } else {
                        format!("no power-off after {:.0} s", timeout.as_secs_f64())
                    };
                    // The kill comes KILL_AFTER_QUIT later anyway: a QEMU
                    // that does not answer by then is frozen.
                    match Qmp::connect_within(
                        &dir.qmp(),
                        Duration::from_millis(500),
                        KILL_AFTER_QUIT,
                    )
                    .and_then(|mut q| q.quit())
                    {
                        Ok(()) => progress(name, &format!("{why}: QMP quit")),
                        Err(e) => progress(
                            name,
                            &format!("{why}: QMP quit failed: {}", crate::error_chain(&e)),
                        ),
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut reg = self.registry();
        for (name, id, _) in &targets {
            let ended = outcomes.iter().any(|o| &o.name == name && o.step.is_some());
            if let Some(inst) = reg.instances.get_mut(name) {
                if inst.kexec && !ended {
                    // Nothing but its agent can end it from here.
                    inst.fail(format!(
                        "its agent did not power it off within {:.0} s; its kernel may still run",
                        timeout.as_secs_f64()
                    ));
                } else {
                    inst.state = State::Stopped;
                }
                inst.started = None;
            }
            if let Some(w) = &window {
                w.agent.fail_peer(*id, "the instance stopped");
            }
            // The RAM files are the instance's memory: gone with it.
            let _ = std::fs::remove_dir_all(self.run.ram(name));
            let how = outcomes
                .iter()
                .find(|o| &o.name == name)
                .and_then(|o| o.step)
                .map(|(step, _)| format!(" ({})", step.words()))
                .unwrap_or_default();
            progress(name, &format!("stopped{how}"));
        }
        outcomes
    }
}

/// Why vCPU threads could not be pinned.
#[derive(Debug, thiserror::Error)]
enum PinError {
    #[error(transparent)]
    Qmp(#[from] crate::daemon::qmp::QmpError),
    #[error("sched_setaffinity({tid}) to host CPU {cpu}")]
    Affinity {
        tid: i32,
        cpu: usize,
        #[source]
        source: nix::errno::Errno,
    },
}

/// Pins each vCPU thread to its host CPU: topology CPU `c` runs on host
/// CPU `c mod` the host's CPU count (the demo machine may be larger than
/// the host it is emulated on).
fn pin_vcpus(qmp: &Path, cpus: &CpuSet) -> Result<String, PinError> {
    let mut q = Qmp::connect(qmp, Duration::from_secs(10))?;
    let threads = q.vcpu_threads()?;
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    let topo: Vec<u32> = cpus.iter().collect();
    let mut done = Vec::new();
    for t in &threads {
        let Some(&c) = topo.get(t.cpu_index as usize) else {
            continue;
        };
        let h = c as usize % host;
        let mut set = nix::sched::CpuSet::new();
        let affinity = |source| PinError::Affinity {
            tid: t.thread_id,
            cpu: h,
            source,
        };
        set.set(h).map_err(affinity)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(t.thread_id), &set)
            .map_err(affinity)?;
        done.push(format!("vCPU {} -> host CPU {h}", t.cpu_index));
    }
    Ok(format!("pinned {}", done.join(", ")))
}
