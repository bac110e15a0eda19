//! The daemon's side of kexec instances: the host's end of their window.
//!
//! On a multikernel host `mkctl boot` starts kexec instances itself,
//! through the kernel's interface (`crate::kexec`, no daemon), and the
//! kernel keeps their state. What the kernel does not do is talk to them:
//! their guest-init maps the topology's window from the pool through
//! `/dev/mem` (`mk.window=`) and attaches its agent, and someone on the
//! host must have formatted that window first and hold endpoint 0. That is
//! this daemon's job for QEMU guests already (the window file, the host's
//! agent, the relays of exec, info, ping, traffic, migrate), so it does the
//! same for kexec instances rather than a second host agent in `mkctl boot`:
//! every request that reaches an agent works for both backends through the
//! same code, and `mkctl status` shows both.
//!
//! The boot is split in two requests around the kernel's own steps, which
//! stay in the CLI:
//! 1. `KexecPrepare` ([`Daemon::kexec_prepare`]): format the window at the
//!    topology's `[window] base` through `/dev/mem` (once; a later boot
//!    finds it and empties the instance's channels), attach the host's agent
//!    as endpoint 0, and register the instances as `booting`, without a
//!    QEMU ([`crate::daemon::state::Inst::kexec`]). The window must exist
//!    before a spawned kernel's guest-init opens it.
//! 2. `KexecBooted` ([`Daemon::kexec_booted`]): the kernel says the
//!    instances are active (or the boot failed, and they are `failed` with
//!    the CLI's reason); wait until each agent answers, as a QEMU boot does.
//!
//! What differs from QEMU guests: there is no doorbell (a spawned kernel has
//! no virtio-serial port), so every receiver polls; an instance ends when
//! its agent leaves the window (a stop asks it to power off; the kernel
//! then halts its CPU), not when a process exits; and a restarted daemon
//! does not take a `/dev/mem` window over.

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{Daemon, Progress};
use crate::daemon::control::Reply;
use crate::daemon::error::{InstanceError, RequestError};
use crate::daemon::state::{Inst, State};
use crate::daemon::window::HostWindow;
use crate::qemu::cmdline::endpoint_names;
use crate::topology::{Backend, Instance, Restart, Topology};

/// Where the host maps physical memory.
pub(super) const DEV_MEM: &str = "/dev/mem";

impl Daemon {
    /// `KexecPrepare`: the window in the pool, endpoint 0, and `only` (all
    /// kexec instances of `config` when empty) registered as booting.
    pub(super) fn kexec_prepare(
        &self,
        config: &Path,
        only: &[String],
        progress: Progress<'_>,
    ) -> Result<Reply, RequestError> {
        let (t, config, named) = super::instances::load_topology(config, only)?;
        if let Some(i) = named
            .iter()
            .find(|i| !only.is_empty() && i.backend != Backend::Kexec)
        {
            return Err(RequestError::NotKexec(i.name.clone()));
        }
        let selected: Vec<Instance> = named
            .into_iter()
            .filter(|i| i.backend == Backend::Kexec)
            .collect();
        self.notice(false);
        let (selected, _already) = self.registry().admit_boot(&config, selected)?;
        let window = self.kexec_window(&config, &t)?;
        {
            let mut reg = self.registry();
            reg.config = Some(config.clone());
            reg.names = endpoint_names(&t);
        }
        for i in &selected {
            let id = u16::try_from(i.id.0).map_err(|_| RequestError::TooManyEndpoints)?;
            // Nothing an earlier run of it left in its channels reaches
            // the new kernel.
            window.reset(id)?;
            let mut reg = self.registry();
            reg.instances.insert(
                i.name.clone(),
                Inst {
                    // The daemon cannot boot a kexec instance again by
                    // itself (the CLI drives the kernel's interface).
                    restart: Restart::No,
                    ..Inst::booting(i, id, self.run.instance(&i.name))
                },
            );
            drop(reg);
            progress(
                &i.name,
                &format!("endpoint {id} of the window {} is waiting", window.place()),
            );
        }
        Ok(Reply::Ok {
            message: format!(
                "the host's agent holds endpoint 0 of {} for {}",
                window.place(),
                selected
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// The window of `t`'s kexec instances: formatted in `/dev/mem` at its
    /// base the first time, the same one afterwards; a daemon that hosts
    /// another window (QEMU's file, another range) refuses.
    fn kexec_window(&self, config: &Path, t: &Topology) -> Result<Arc<HostWindow>, RequestError> {
        let range = t
            .window
            .range
            .ok_or_else(|| RequestError::NoKexecWindow(config.to_path_buf()))?;
        let (base, size) = (range.start.0, range.size());
        let wanted = format!("{DEV_MEM} at 0x{base:x} ({} MiB)", size >> 20);
        let need = t.instances.iter().map(|i| i.id.0).max().unwrap_or(0);
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = w.as_ref() {
            if w.phys() != Some((base, size)) {
                return Err(RequestError::OtherWindow {
                    running: w.place().to_string(),
                    wanted,
                });
            }
            if u32::from(w.endpoints()) <= need {
                return Err(RequestError::WindowTooSmall {
                    endpoints: w.endpoints(),
                    need,
                });
            }
            w.agent.name_peers(endpoint_names(t));
            return Ok(Arc::clone(w));
        }
        let endpoints = u16::try_from(need + 1).map_err(|_| RequestError::TooManyEndpoints)?;
        let hw = self.host_agent(|agent| {
            HostWindow::create_phys(Path::new(DEV_MEM), base, size, endpoints, agent)
        })?;
        hw.agent.name_peers(endpoint_names(t));
        log::info!(
            "formatted the kexec window {} for endpoints 0-{}",
            hw.place(),
            endpoints - 1
        );
        *w = Some(Arc::clone(&hw));
        drop(w);
        // For a daemon that takes over after this one (see `adopt`).
        self.registry().kexec_window = Some((base, size));
        Ok(hw)
    }

    /// `KexecBooted`: after the kernel's side of the boot of `names`, wait
    /// until each agent answers (at most `timeout`), or record why the
    /// boot failed.
    pub(super) fn kexec_booted(
        &self,
        names: &[String],
        booted: bool,
        reason: &str,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<Reply, RequestError> {
        let known: Vec<(String, u16)> = {
            let reg = self.registry();
            reg.check_names(names)?;
            names
                .iter()
                .filter_map(|n| reg.instances.get(n))
                .filter(|i| i.kexec && i.state == State::Booting)
                .map(|i| (i.name.clone(), i.id))
                .collect()
        };
        if !booted {
            for (name, _) in &known {
                self.fail(name, reason, false);
            }
            return Ok(Reply::Ok {
                message: format!("{} failed: {reason}", names.join(", ")),
            });
        }
        let window = self
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(RequestError::NoWindow)?;
        let mut waiting = known;
        let mut failures: Vec<(String, InstanceError)> = Vec::new();
        let mut announced: Vec<String> = Vec::new();
        let deadline = Instant::now() + timeout;
        while !waiting.is_empty() {
            waiting.retain(|(name, id)| {
                match self.agent_ready(&window, name, *id, &mut announced, progress) {
                    Ok(true) => false,
                    Ok(false) => true,
                    Err(e) => {
                        failures.push((name.clone(), e));
                        false
                    }
                }
            });
            if waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for (name, _) in &waiting {
                    let seen = if announced.contains(name) {
                        "it attached, then did not answer"
                    } else {
                        "it never attached: is guest-init its init?"
                    };
                    self.fail(name, "no agent answered after its kexec boot", false);
                    failures.push((name.clone(), InstanceError::NoAgent { timeout, seen }));
                }
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        if !failures.is_empty() {
            return Err(RequestError::Boot(failures));
        }
        Ok(Reply::Ok {
            message: format!("{} ready", names.join(", ")),
        })
    }
}
