//! Taking over what an earlier daemon of this run directory left running
//! (it was killed, crashed, or handed over with `mkctl daemon restart`):
//! from its state file ([`crate::daemon::saved`]), every QEMU that still
//! runs as the same process becomes this daemon's, and the window, the
//! host's agent, the doorbell relay and the DSM socket are set up again
//! around them. The guests notice nothing but a host that was silent for a
//! while: their links outlive a peer's restart. Kexec instances have no
//! process to find: the window in `/dev/mem` is opened again where the
//! state file says (not formatted: their agents are attached to it), and
//! each is taken back when its agent answers within [`ANSWER_WITHIN`].
//!
//! What an instance becomes:
//!
//! | saved state      | its QEMU runs                    | its QEMU is gone        |
//! | ---              | ---                              | ---                     |
//! | ready            | ready (adopted)                  | failed, saying so       |
//! | ready, kexec     | ready once its agent answers within [`ANSWER_WITHIN`], else failed | |
//! | booting          | ready once its agent answers within [`ANSWER_WITHIN`], else failed | failed |
//! | stopping         | killed, stopped                  | stopped                 |
//! | failed           | failed (a stop or boot kills it) | failed                  |
//! | stopped          | killed, stopped                  | stopped                 |
//!
//! What is not carried over: requests under way when the earlier daemon
//! died (their clients saw the connection close), the host agent's DSM
//! state and the threads moved from host processes, and the timing of a
//! restart the policy had scheduled (it counts on, from the saved count).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mknode::wire::Msg;

use super::kexec::DEV_MEM;
use super::Daemon;
use crate::daemon::process::Qemu;
use crate::daemon::saved::{Saved, SavedInst};
use crate::daemon::state::{Inst, PolicyState, State};
use crate::daemon::window::HostWindow;
use crate::units::CpuSet;

/// How long a guest that was booting has to answer the new host agent.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl Daemon {
    /// Adopts what the state file describes (nothing when there is none).
    pub(super) fn adopt(&self) {
        let path = self.run.state();
        let saved = match Saved::load(&path) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                log::warn!("{}; nothing adopted", crate::error_chain(&e));
                return;
            }
        };
        let mut live: Vec<(String, u16, State)> = Vec::new();
        let mut told: Vec<String> = Vec::new();
        {
            let mut reg = self.registry();
            reg.config = saved.config.clone();
            reg.names = saved.names.clone();
            reg.kexec_window = saved.kexec_window;
            for si in &saved.instances {
                let inst = self.adopt_one(si, saved.kexec_window.is_some());
                told.push(format!(
                    "{} {}{}",
                    inst.name,
                    inst.state.as_str(),
                    inst.child
                        .as_ref()
                        .map(|q| format!(" (qemu pid {})", q.id()))
                        .or_else(|| inst.reason.as_ref().map(|r| format!(": {r}")))
                        .unwrap_or_default()
                ));
                if (inst.child.is_some() || inst.kexec) && inst.state.is_live() {
                    live.push((inst.name.clone(), inst.id, inst.state));
                }
                reg.instances.insert(inst.name.clone(), inst);
            }
        }
        log::info!(
            "adopted from {}: {}",
            path.display(),
            if told.is_empty() {
                "nothing".into()
            } else {
                told.join("; ")
            }
        );
        if live.is_empty() {
            return;
        }
        let kexec = {
            let reg = self.registry();
            live.iter()
                .any(|(name, ..)| reg.instances.get(name).is_some_and(|i| i.kexec))
        };
        let window = match self.host_agent(|agent| match (kexec, saved.kexec_window) {
            (true, Some((base, size))) => {
                HostWindow::adopt_phys(std::path::Path::new(DEV_MEM), base, size, agent)
            }
            _ => HostWindow::adopt(&self.run.window(), agent),
        }) {
            Ok(w) => w,
            Err(e) => {
                let why = format!(
                    "the daemon restarted and could not open the window: {}",
                    crate::error_chain(&e)
                );
                log::error!("{why}");
                let mut reg = self.registry();
                for (name, _, _) in &live {
                    if let Some(inst) = reg.instances.get_mut(name) {
                        inst.fail(why.clone());
                    }
                }
                return;
            }
        };
        window.agent.name_peers(saved.names.clone());
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&window));
        if let Some(relay) = window.relay() {
            for (name, id, _) in &live {
                if let Err(e) = relay.attach(*id, &self.run.instance(name).doorbell()) {
                    log::warn!("{name}: no doorbell relay, its receivers poll: {e}");
                }
            }
        }
        // A guest that was booting, or any kexec instance (no process says
        // it still runs), is ready once its agent answers.
        let deadline = Instant::now() + ANSWER_WITHIN;
        for (name, id, state) in live {
            if state != State::Booting && !kexec {
                continue;
            }
            let kernel =
                loop {
                    if window.peer_alive(id) {
                        if let Ok(Msg::Info { info, .. }) =
                            window.agent.call(id, Duration::from_millis(1500), |req| {
                                Msg::InfoRequest { req }
                            })
                        {
                            break Some(info.release);
                        }
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                };
            let mut reg = self.registry();
            if let Some(inst) = reg.instances.get_mut(&name) {
                match kernel {
                    Some(k) => {
                        inst.state = State::Ready;
                        inst.kernel = Some(k);
                        inst.policy.armed = true;
                        inst.kexec_adopted = inst.kexec;
                    }
                    None if kexec => inst.fail(format!(
                        "a kexec instance whose agent did not answer the restarted daemon within {} s (its kernel may have stopped); `mkctl stop {name}`, then boot it again",
                        ANSWER_WITHIN.as_secs()
                    )),
                    None => inst.fail(format!(
                        "it was booting when its daemon went away, and its agent did not answer within {} s; `mkctl restart {name}`",
                        ANSWER_WITHIN.as_secs()
                    )),
                }
            }
        }
    }

    /// One saved instance as this daemon takes it (see the module's table).
    /// `kexec_window`: the state file says where the kexec window is.
    fn adopt_one(&self, si: &SavedInst, kexec_window: bool) -> Inst {
        let was = si.state();
        let mut qemu = si.qemu.and_then(|(pid, start)| Qemu::adopt(pid, start));
        let (state, reason) = match (was, qemu.is_some() || si.kexec) {
            (State::Ready | State::Booting, true) if si.kexec && !kexec_window => (
                State::Failed,
                Some("a kexec instance, but the state file does not say where its window is (an older daemon wrote it): `mkctl stop` it, then boot it again".to_string()),
            ),
            (State::Ready | State::Booting, true) => (was, None),
            (State::Failed, _) => (was, si.reason.clone()),
            (State::Ready | State::Booting, false) => (
                State::Failed,
                Some(match si.qemu {
                    Some((pid, _)) => format!("its QEMU (pid {pid}) exited while no daemon ran"),
                    None => "it had no QEMU to take over".to_string(),
                }),
            ),
            (State::Stopping | State::Stopped, _) => {
                // Its stop was under way: finished now.
                if let Some(mut q) = qemu.take() {
                    q.kill();
                }
                let _ = std::fs::remove_dir_all(self.run.ram(&si.name));
                (State::Stopped, None)
            }
        };
        let started = qemu
            .as_ref()
            .and_then(Qemu::age)
            .and_then(|age| Instant::now().checked_sub(age));
        Inst {
            name: si.name.clone(),
            id: si.id,
            cpus: CpuSet::parse(&si.cpus).unwrap_or_default(),
            memory: si.memory,
            state,
            reason,
            child: qemu,
            started,
            kernel: si.kernel.clone(),
            dir: self.run.instance(&si.name),
            restart: si.restart,
            policy: PolicyState {
                restarts: si.restarts,
                armed: si.armed && state == State::Ready,
                due: None,
                running: false,
            },
            kexec: si.kexec,
            kexec_adopted: false,
        }
    }
}
