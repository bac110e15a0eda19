//! The daemon's instances and the rules of their lifecycle, apart from
//! sockets and QEMU so the rules can be tested alone.
//!
//! ```text
//!            boot                 agent answers
//!  (none) ─────────▶ booting ───────────────────▶ ready
//!  stopped ─────────▶   │                           │
//!  failed  ─────────▶   │ QEMU exits, timeout       │ QEMU exits, heartbeat stops
//!                       ▼                           ▼
//!                    failed ◀───────────────────────┘
//!   booting/ready ── stop ──▶ stopping ── QEMU gone ──▶ stopped
//! ```
//!
//! What a request may do in each state:
//!
//! | state    | boot                 | exec, info, ping, migrate... | stop            |
//! | ---      | ---                  | ---                          | ---             |
//! | (none)   | starts it            | refused: unknown             | refused: unknown|
//! | booting  | refused: busy        | refused: is booting          | stops it        |
//! | ready    | nothing (is ready)   | served                       | stops it        |
//! | stopping | refused: busy        | refused: is stopping         | waits with it   |
//! | stopped  | starts it            | refused: is stopped          | nothing to do   |
//! | failed   | starts it            | refused: has failed (why)    | stays failed    |
//!
//! The restart policy (`restart = "on-failure"` in the topology) acts on
//! `failed` alone, through [`Inst::policy_step`]: an instance that was
//! `ready` since a request booted it (or that the policy booted) and then
//! failed is restarted after a backoff, at most `restart_limit` times; after
//! that it stays `failed` and its reason says the limit was reached. A stop
//! disarms it (a deliberate stop is never a failure, and it cancels a
//! restart that waits for its backoff); a boot or restart by a request
//! starts the count again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::error::RequestError;
use super::paths::InstanceDir;
use super::process::Qemu;
use crate::topology::{Backend, Instance, Restart};
use crate::units::CpuSet;

/// Lifecycle of one instance, as `mkctl status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Booting,
    Ready,
    Stopping,
    Stopped,
    Failed,
}

/// What `boot` does with an instance in some state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBoot {
    Start,
    /// Already up: left as it is (booting a running topology is no error).
    AlreadyReady,
    /// Booting or stopping: the caller must wait.
    Busy,
}

/// What `stop` does with an instance in some state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// It has a process: stop it.
    Stop,
    /// Nothing runs: mark it stopped.
    NothingRuns,
    /// It failed, and stays failed (the reason is kept).
    StaysFailed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Booting => "booting",
            State::Ready => "ready",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }

    /// A kernel is up or on its way (or on its way down).
    pub fn is_running(self) -> bool {
        matches!(self, State::Booting | State::Ready | State::Stopping)
    }

    /// Whether it has an uptime and a heartbeat worth showing.
    pub fn is_live(self) -> bool {
        matches!(self, State::Booting | State::Ready)
    }

    pub fn on_boot(self) -> OnBoot {
        match self {
            State::Ready => OnBoot::AlreadyReady,
            State::Booting | State::Stopping => OnBoot::Busy,
            State::Stopped | State::Failed => OnBoot::Start,
        }
    }

    /// Only a ready instance serves requests.
    pub fn serves(self) -> bool {
        self == State::Ready
    }

    /// `has_process`: its QEMU still runs.
    pub fn on_stop(self, has_process: bool) -> OnStop {
        match (self, has_process) {
            (_, true) => OnStop::Stop,
            (State::Failed, false) => OnStop::StaysFailed,
            (_, false) => OnStop::NothingRuns,
        }
    }

    /// The state after its QEMU exited on its own (not by a stop).
    pub fn on_process_exit(self) -> State {
        match self {
            // A stop finishes the job (and marks it stopped).
            State::Stopping => State::Stopping,
            _ => State::Failed,
        }
    }

    /// The state after its agent stopped beating.
    pub fn on_heartbeat_lost(self) -> State {
        match self {
            State::Ready => State::Failed,
            s => s,
        }
    }
}

/// One instance as the daemon runs it.
#[derive(Debug)]
pub struct Inst {
    pub name: String,
    pub id: u16,
    pub cpus: CpuSet,
    pub memory: u64,
    pub state: State,
    pub reason: Option<String>,
    /// Its QEMU, spawned by this daemon or adopted from an earlier one.
    pub child: Option<Qemu>,
    pub started: Option<Instant>,
    pub kernel: Option<String>,
    pub dir: InstanceDir,
    /// `restart` of its `[[instance]]`, as the file said at its last boot.
    pub restart: Restart,
    /// What the restart policy did and will do for it.
    pub policy: PolicyState,
    /// A kexec instance: a kernel the multikernel interface runs on the
    /// host's own CPUs (started by `mkctl boot`, not by this daemon), which
    /// has no QEMU; it runs while its agent is attached to the window.
    pub kexec: bool,
    /// A kexec instance this daemon took over from an earlier one (its
    /// agent answered); a QEMU's handle says so for the others.
    pub kexec_adopted: bool,
}

impl Inst {
    /// Instance `i` of the topology as its boot begins, as endpoint `id`
    /// with its files in `dir` (no QEMU yet, a fresh restart policy).
    pub fn booting(i: &Instance, id: u16, dir: InstanceDir) -> Inst {
        Inst {
            name: i.name.clone(),
            id,
            cpus: i.cpus.clone(),
            memory: i.memory.size(),
            state: State::Booting,
            reason: None,
            child: None,
            started: Some(Instant::now()),
            kernel: None,
            dir,
            restart: i.restart,
            policy: PolicyState::default(),
            kexec: i.backend == Backend::Kexec,
            kexec_adopted: false,
        }
    }
}

/// Who asked for a boot (or restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartedBy {
    /// A request (`mkctl boot`, `mkctl restart`): the restart count starts
    /// again, and the policy watches the instance once it is `ready` (a
    /// boot that fails is the requester's to see, not to retry).
    Request,
    /// The restart policy: the count goes on, and a failure during this
    /// boot counts as the next failure.
    Policy,
}

/// The restart policy's bookkeeping for one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Restarts the policy began since a request last booted the instance.
    pub restarts: u32,
    /// The policy acts when it fails: it was `ready` since a request
    /// booted it, or the policy booted it. A stop disarms it.
    pub armed: bool,
    /// A restart waits for its backoff until then.
    pub due: Option<Instant>,
    /// A restart by the policy is under way.
    pub running: bool,
}

impl PolicyState {
    /// The state an instance's new boot starts with, `prev` being what it
    /// had before (if it ran before).
    pub fn for_boot(prev: Option<&PolicyState>, by: StartedBy) -> PolicyState {
        match by {
            StartedBy::Request => PolicyState::default(),
            StartedBy::Policy => PolicyState {
                armed: true,
                due: None,
                ..prev.cloned().unwrap_or_default()
            },
        }
    }
}

/// What the restart policy does about an instance now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyStep {
    Idle,
    /// It just failed: restart number `attempt` of `limit` waits `after`.
    Scheduled {
        attempt: u32,
        limit: u32,
        after: Duration,
    },
    /// Restart it now (restart number `attempt` of `limit`, counted).
    RestartNow {
        attempt: u32,
        limit: u32,
    },
    /// It failed again with `limit` restarts spent: it stays failed, and
    /// its reason now says so.
    GaveUp {
        limit: u32,
    },
}

/// The wait before the policy's restart number `attempt` (1, 2, ...): 1 s,
/// doubling, at most 30 s; short, since a guest boots in seconds, but
/// growing so a guest that dies at once does not keep two CPUs busy.
pub fn restart_backoff(attempt: u32) -> Duration {
    let secs = 1u64 << attempt.saturating_sub(1).min(5);
    Duration::from_secs(secs.min(30))
}

impl Inst {
    /// Marks it failed for `reason`.
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.state = State::Failed;
        self.reason = Some(reason.into());
    }

    /// The restart policy's next step at `now` (the monitor asks after
    /// every look at the instances).
    pub fn policy_step(&mut self, now: Instant) -> PolicyStep {
        let Restart::OnFailure { limit } = self.restart else {
            return PolicyStep::Idle;
        };
        let p = &mut self.policy;
        if self.state != State::Failed || !p.armed || p.running {
            return PolicyStep::Idle;
        }
        match p.due {
            None if p.restarts >= limit => {
                p.armed = false;
                let last = self.reason.take().unwrap_or_else(|| "failed".into());
                self.reason = Some(format!(
                    "failed {} times; restart limit {limit} reached: {last}",
                    p.restarts.saturating_add(1)
                ));
                PolicyStep::GaveUp { limit }
            }
            None => {
                let attempt = p.restarts.saturating_add(1);
                let after = restart_backoff(attempt);
                p.due = Some(now + after);
                PolicyStep::Scheduled {
                    attempt,
                    limit,
                    after,
                }
            }
            Some(at) if now >= at => {
                p.due = None;
                p.restarts = p.restarts.saturating_add(1);
                p.running = true;
                PolicyStep::RestartNow {
                    attempt: p.restarts,
                    limit,
                }
            }
            Some(_) => PolicyStep::Idle,
        }
    }
}

/// Every instance of the daemon, and the topology they come from.
#[derive(Debug, Default)]
pub struct Registry {
    pub config: Option<PathBuf>,
    /// The window's endpoint names (the host and every instance of the
    /// topology), as the host agent says them.
    pub names: Vec<(u16, String)>,
    pub instances: BTreeMap<String, Inst>,
    /// The physical range (base, size) of the `/dev/mem` window the kexec
    /// instances are linked through, once formatted.
    pub kexec_window: Option<(u64, u64)>,
}

fn list_or_none(names: Vec<&str>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

impl Registry {
    fn known(&self) -> Vec<&str> {
        self.instances.keys().map(String::as_str).collect()
    }

    /// Every name must be an instance of this daemon.
    pub fn check_names(&self, names: &[String]) -> Result<(), RequestError> {
        match names.iter().find(|n| !self.instances.contains_key(*n)) {
            None => Ok(()),
            Some(n) => Err(RequestError::UnknownInstance {
                name: n.clone(),
                known: list_or_none(self.known()),
            }),
        }
    }

    /// A kernel's endpoint id, by instance name or id; "host" and "0" are
    /// the host.
    pub fn endpoint_of(&self, name: &str) -> Result<u16, RequestError> {
        if name == "host" || name == "0" {
            return Ok(0);
        }
        self.instances
            .get(name)
            .or_else(|| self.instances.values().find(|i| i.id.to_string() == name))
            .map(|i| i.id)
            .ok_or_else(|| RequestError::UnknownKernel {
                name: name.to_string(),
                known: self.known().join(", "),
            })
    }

    /// [`Registry::endpoint_of`] a kernel that serves requests now.
    pub fn ready_endpoint(&self, name: &str) -> Result<u16, RequestError> {
        let id = self.endpoint_of(name)?;
        match self.instances.values().find(|i| i.id == id) {
            Some(i) if !i.state.serves() => Err(RequestError::NotReady {
                name: i.name.clone(),
                state: i.state.as_str(),
                reason: i.reason.clone(),
            }),
            _ => Ok(id),
        }
    }

    /// Which of `selected` (from `config`) a boot starts; refuses the boot
    /// when another topology runs or one of them is busy.
    pub fn admit_boot(
        &self,
        config: &PathBuf,
        selected: Vec<Instance>,
    ) -> Result<(Vec<Instance>, Vec<String>), RequestError> {
        if let Some(c) = &self.config {
            if c != config && self.instances.values().any(|i| i.state.is_running()) {
                return Err(RequestError::OtherTopology { config: c.clone() });
            }
        }
        let state_of = |i: &Instance| self.instances.get(&i.name).map(|o| o.state);
        let busy: Vec<String> = selected
            .iter()
            .filter_map(|i| match state_of(i) {
                Some(s) if s.on_boot() == OnBoot::Busy => {
                    Some(format!("{} is {}", i.name, s.as_str()))
                }
                _ => None,
            })
            .collect();
        if !busy.is_empty() {
            return Err(RequestError::Busy { busy });
        }
        let (ready, start): (Vec<Instance>, Vec<Instance>) = selected
            .into_iter()
            .partition(|i| state_of(i).map(State::on_boot) == Some(OnBoot::AlreadyReady));
        Ok((start, ready.into_iter().map(|i| i.name).collect()))
    }

    /// Starts a stop of `names`: those with a process become `stopping`
    /// and are returned (name, id, dir); the others are settled at once.
    /// Also returns each one's state before, for [`stop_summary`].
    #[allow(clippy::type_complexity)]
    pub fn begin_stop(
        &mut self,
        names: &[String],
    ) -> (Vec<(String, u16, InstanceDir)>, Vec<Stopped>) {
        let before = names
            .iter()
            .map(|n| Stopped {
                name: n.clone(),
                before: self.instances.get(n).map(|i| i.state),
                step: None,
            })
            .collect();
        let mut targets = Vec::new();
        for n in names {
            let Some(inst) = self.instances.get_mut(n) else {
                continue;
            };
            // A deliberate stop: no restart by the policy, now or pending.
            inst.policy.armed = false;
            inst.policy.due = None;
            let runs = inst.child.is_some() || (inst.kexec && inst.state.is_live());
            match inst.state.on_stop(runs) {
                OnStop::Stop => {
                    inst.state = State::Stopping;
                    targets.push((n.clone(), inst.id, inst.dir.clone()));
                }
                OnStop::NothingRuns => inst.state = State::Stopped,
                OnStop::StaysFailed => {}
            }
        }
        (targets, before)
    }
}

/// The step of a stop's escalation that ended an instance's QEMU: the
/// agent's power-off, then (after the timeout) QMP `quit`, then (3 s
/// later) a kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopStep {
    /// It powered off after its agent was asked to.
    Agent,
    /// It quit when QMP asked.
    QmpQuit,
    /// It was killed.
    Kill,
}

impl StopStep {
    /// For people.
    pub fn words(self) -> &'static str {
        match self {
            StopStep::Agent => "powered off by its agent",
            StopStep::QmpQuit => "QMP quit",
            StopStep::Kill => "killed",
        }
    }
}

/// One instance of a stop: its state before, and how its QEMU ended
/// (`None` when none ran) after how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub name: String,
    pub before: Option<State>,
    pub step: Option<(StopStep, Duration)>,
}

/// What `mkctl stop` did: the instances it stopped, each with the step that
/// ended it, and those that were not running (already stopped, or failed)
/// named as such.
pub fn stop_summary(outcomes: &[Stopped]) -> String {
    let (mut stopped, mut others) = (Vec::new(), Vec::new());
    for o in outcomes {
        let name = &o.name;
        match (o.before, o.step) {
            (Some(State::Failed), Some((step, _))) => {
                others.push(format!("{name} had failed ({})", step.words()));
            }
            (Some(State::Failed), None) => others.push(format!("{name} had failed")),
            (_, Some((step, took))) => stopped.push(format!(
                "{name} ({}, {:.1} s)",
                step.words(),
                took.as_secs_f64()
            )),
            (Some(State::Stopped) | None, None) => {
                others.push(format!("{name} was not running"));
            }
            (Some(_), None) => stopped.push(name.clone()),
        }
    }
    let mut parts = Vec::new();
    if !stopped.is_empty() {
        parts.push(format!("stopped {}", stopped.join(", ")));
    }
    parts.extend(others);
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [State; 5] = [
        State::Booting,
        State::Ready,
        State::Stopping,
        State::Stopped,
        State::Failed,
    ];

    fn inst(name: &str, id: u16, state: State) -> Inst {
        Inst {
            name: name.into(),
            id,
            cpus: CpuSet::new(),
            memory: 0,
            state,
            reason: (state == State::Failed).then(|| "qemu exited unexpectedly".into()),
            child: None,
            started: None,
            kernel: None,
            dir: InstanceDir(PathBuf::from("/nonexistent").join(name)),
            restart: Restart::No,
            policy: PolicyState::default(),
            kexec: false,
            kexec_adopted: false,
        }
    }

    fn registry(states: &[(&str, State)]) -> Registry {
        let mut r = Registry {
            config: Some(PathBuf::from("/t/demo.toml")),
            ..Registry::default()
        };
        for (k, (n, s)) in states.iter().enumerate() {
            r.instances.insert(n.to_string(), inst(n, k as u16 + 1, *s));
        }
        r
    }

    /// An instance of the demo topology.
    fn topo_instance(name: &str) -> Instance {
        let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo.toml");
        let t = crate::topology::load(&demo, || None).expect("the demo topology loads");
        t.instance(name).expect("the demo has it").clone()
    }

    #[test]
    fn what_each_request_may_do_in_each_state() {
        let table: Vec<(State, OnBoot, bool, OnStop, OnStop)> = ALL
            .iter()
            .map(|&s| {
                (
                    s,
                    s.on_boot(),
                    s.serves(),
                    s.on_stop(true),
                    s.on_stop(false),
                )
            })
            .collect();
        use OnBoot::*;
        use OnStop::*;
        assert_eq!(
            table,
            vec![
                (State::Booting, Busy, false, Stop, NothingRuns),
                (State::Ready, AlreadyReady, true, Stop, NothingRuns),
                (State::Stopping, Busy, false, Stop, NothingRuns),
                (State::Stopped, Start, false, Stop, NothingRuns),
                (State::Failed, Start, false, Stop, StaysFailed),
            ]
        );
    }

    #[test]
    fn events_move_states_as_the_diagram_says() {
        let after_exit: Vec<State> = ALL.iter().map(|s| s.on_process_exit()).collect();
        assert_eq!(
            after_exit,
            [
                State::Failed,
                State::Failed,
                State::Stopping,
                State::Failed,
                State::Failed
            ]
        );
        let after_silence: Vec<State> = ALL.iter().map(|s| s.on_heartbeat_lost()).collect();
        assert_eq!(
            after_silence,
            [
                State::Booting,
                State::Failed,
                State::Stopping,
                State::Stopped,
                State::Failed
            ]
        );
        let live: Vec<bool> = ALL.iter().map(|s| s.is_live()).collect();
        assert_eq!(live, [true, true, false, false, false]);
        let running: Vec<bool> = ALL.iter().map(|s| s.is_running()).collect();
        assert_eq!(running, [true, true, true, false, false]);
    }

    #[test]
    fn requests_reach_only_ready_kernels_and_say_why_not() {
        let r = registry(&[("alpha", State::Ready), ("beta", State::Failed)]);
        assert_eq!(r.ready_endpoint("alpha").unwrap(), 1);
        assert_eq!(r.ready_endpoint("1").unwrap(), 1);
        assert_eq!(r.ready_endpoint("host").unwrap(), 0);
        let e = r.ready_endpoint("beta").unwrap_err();
        assert_eq!(
            e.to_string(),
            "instance \"beta\" has failed: qemu exited unexpectedly"
        );
        assert_eq!(e.exit_code(), 1);
        let e = r.ready_endpoint("gamma").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no instance \"gamma\" (known: host, alpha, beta)"
        );
        assert_eq!(e.exit_code(), 2);
        let e = r.check_names(&["alpha".into(), "zeta".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no instance \"zeta\" in this daemon (it has: alpha, beta)"
        );
        let e = Registry::default().check_names(&["x".into()]).unwrap_err();
        assert!(e.to_string().ends_with("(it has: none)"), "{e}");
    }

    #[test]
    fn boot_starts_stopped_and_failed_skips_ready_and_refuses_busy() {
        let config = PathBuf::from("/t/demo.toml");
        for (state, starts, ready) in [
            (None, true, false),
            (Some(State::Stopped), true, false),
            (Some(State::Failed), true, false),
            (Some(State::Ready), false, true),
        ] {
            let r = match state {
                Some(s) => registry(&[("alpha", s)]),
                None => registry(&[]),
            };
            let (start, already) = r.admit_boot(&config, vec![topo_instance("alpha")]).unwrap();
            assert_eq!(start.len() == 1, starts, "{state:?}");
            assert_eq!(already == ["alpha"], ready, "{state:?}");
        }
        for s in [State::Booting, State::Stopping] {
            let e = registry(&[("alpha", s)])
                .admit_boot(&config, vec![topo_instance("alpha")])
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("alpha is {}; wait for it, or stop it first", s.as_str())
            );
        }
        // Another topology is refused while this one runs, not after.
        let other = PathBuf::from("/t/other.toml");
        let e = registry(&[("alpha", State::Ready)])
            .admit_boot(&other, vec![topo_instance("alpha")])
            .unwrap_err();
        assert!(matches!(e, RequestError::OtherTopology { .. }), "{e}");
        assert!(registry(&[("alpha", State::Stopped)])
            .admit_boot(&other, vec![topo_instance("alpha")])
            .is_ok());
    }

    #[test]
    fn stop_settles_what_does_not_run_and_names_it() {
        let mut r = registry(&[
            ("alpha", State::Failed),
            ("beta", State::Stopped),
            ("gamma", State::Ready),
        ]);
        let names: Vec<String> = ["alpha", "beta", "gamma"].map(String::from).to_vec();
        let (targets, before) = r.begin_stop(&names);
        // No QEMU runs in this test, so nothing needs stopping; a failed
        // instance keeps its state and reason.
        assert!(targets.is_empty());
        assert_eq!(r.instances["alpha"].state, State::Failed);
        assert!(r.instances["alpha"].reason.is_some());
        assert_eq!(r.instances["gamma"].state, State::Stopped);
        assert_eq!(
            stop_summary(&before),
            "stopped gamma; alpha had failed; beta was not running"
        );
    }

    #[test]
    fn the_policy_restarts_a_failed_instance_after_a_backoff_up_to_its_limit() {
        use PolicyStep::*;
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut a = inst("alpha", 1, State::Ready);
        a.restart = Restart::OnFailure { limit: 2 };
        a.policy.armed = true;
        assert_eq!(a.policy_step(t0), Idle, "ready: nothing to do");
        a.fail("qemu exited unexpectedly (signal: 9 (SIGKILL))");
        assert_eq!(
            a.policy_step(t0),
            Scheduled {
                attempt: 1,
                limit: 2,
                after: s(1)
            }
        );
        assert_eq!(a.policy_step(t0 + s(1) / 2), Idle, "in its backoff");
        assert_eq!(
            a.policy_step(t0 + s(1)),
            RestartNow {
                attempt: 1,
                limit: 2
            }
        );
        assert_eq!(a.policy_step(t0 + s(9)), Idle, "while the restart runs");

        // The policy's boot keeps the count and watches at once: a failure
        // during that boot is the next failure.
        let mut b = inst("alpha", 1, State::Booting);
        b.restart = a.restart;
        b.policy = PolicyState::for_boot(Some(&a.policy), StartedBy::Policy);
        assert_eq!((b.policy.restarts, b.policy.armed), (1, true));
        b.fail("qemu exited during boot (exit status: 1)");
        assert_eq!(b.policy_step(t0), Idle, "the restart has not returned");
        b.policy.running = false;
        assert_eq!(
            b.policy_step(t0),
            Scheduled {
                attempt: 2,
                limit: 2,
                after: s(2)
            }
        );
        assert_eq!(
            b.policy_step(t0 + s(2)),
            RestartNow {
                attempt: 2,
                limit: 2
            }
        );

        // Ready again, then a third failure: the limit is spent.
        let mut c = inst("alpha", 1, State::Ready);
        c.restart = b.restart;
        c.policy = PolicyState::for_boot(Some(&b.policy), StartedBy::Policy);
        c.policy.running = false;
        c.fail("heartbeat stopped 5.0 s ago");
        assert_eq!(c.policy_step(t0), GaveUp { limit: 2 });
        assert_eq!(
            c.reason.as_deref(),
            Some("failed 3 times; restart limit 2 reached: heartbeat stopped 5.0 s ago")
        );
        assert_eq!(c.state, State::Failed);
        assert_eq!(c.policy_step(t0 + s(60)), Idle, "and stays failed");
        assert!(c.reason.as_deref().unwrap().starts_with("failed 3 times"));

        // A request's boot starts the count again, and watches only once
        // the instance is ready.
        let fresh = PolicyState::for_boot(Some(&c.policy), StartedBy::Request);
        assert_eq!(fresh, PolicyState::default());
    }

    #[test]
    fn the_policy_leaves_alone_what_it_must_not_restart() {
        let t0 = Instant::now();
        // No policy.
        let mut a = inst("alpha", 1, State::Failed);
        a.policy.armed = true;
        assert_eq!(a.policy_step(t0), PolicyStep::Idle);
        // Failed during a request's boot: never ready, not watched.
        let mut b = inst("beta", 2, State::Failed);
        b.restart = Restart::OnFailure { limit: 3 };
        assert_eq!(b.policy_step(t0), PolicyStep::Idle);
        // A stop, also of a failed instance waiting for its restart,
        // disarms it: nothing restarts it afterwards.
        let mut r = registry(&[("alpha", State::Failed), ("gamma", State::Ready)]);
        for i in r.instances.values_mut() {
            i.restart = Restart::OnFailure { limit: 3 };
            i.policy.armed = true;
        }
        let alpha = r.instances.get_mut("alpha").unwrap();
        assert!(matches!(
            alpha.policy_step(t0),
            PolicyStep::Scheduled { attempt: 1, .. }
        ));
        r.begin_stop(&["alpha".into(), "gamma".into()]);
        for i in r.instances.values_mut() {
            assert_eq!(i.policy.due, None);
            assert_eq!(
                i.policy_step(t0 + Duration::from_secs(60)),
                PolicyStep::Idle
            );
        }
        // A stopped instance whose QEMU then exits is stopping, not failed.
        assert_eq!(State::Stopping.on_process_exit(), State::Stopping);
    }

    #[test]
    fn backoff_doubles_from_one_second_to_thirty() {
        let secs: Vec<u64> = (1..=8).map(|n| restart_backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn stop_names_only_running_instances_as_stopped() {
        let s = |v: &[(&str, Option<State>)]| {
            stop_summary(
                &v.iter()
                    .map(|(n, st)| Stopped {
                        name: n.to_string(),
                        before: *st,
                        step: None,
                    })
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

    #[test]
    fn stop_says_which_step_ended_each_instance() {
        let o = |name: &str, before: State, step: StopStep, ms: u64| Stopped {
            name: name.into(),
            before: Some(before),
            step: Some((step, Duration::from_millis(ms))),
        };
        assert_eq!(
            stop_summary(&[
                o("alpha", State::Ready, StopStep::Agent, 1200),
                o("beta", State::Booting, StopStep::QmpQuit, 15_050),
                o("gamma", State::Ready, StopStep::Kill, 18_000),
                o("delta", State::Failed, StopStep::Kill, 3_000),
            ]),
            "stopped alpha (powered off by its agent, 1.2 s), beta (QMP quit, 15.1 s), \
             gamma (killed, 18.0 s); delta had failed (killed)"
        );
        // The JSON names of the steps, which scripts match on.
        let names: Vec<String> = [StopStep::Agent, StopStep::QmpQuit, StopStep::Kill]
            .iter()
            .map(|s| serde_json::to_string(s).unwrap())
            .collect();
        assert_eq!(names, ["\"agent\"", "\"qmp-quit\"", "\"kill\""]);
    }
}
