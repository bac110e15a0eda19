//! The boot, stop and release sequences as named, logged steps against a
//! [`KernelIface`]. A failed boot step undoes every earlier step in reverse
//! and reports the step, the errno or status, the kernel's last messages
//! and what the rollback did.
//!
//! Current generation, boot: mount (if needed) → read the pool → baseline
//! (or a pool overlay adding what is missing) → one create overlay per
//! instance, checking each transaction's status → check the window → per
//! instance: load → start → poll its status to `active`.
//! Stop: halt (force after a timeout) → unload → remove overlay.
//! Release: one `/resources` overlay giving every pool CPU and chunk back.
//! v1: the single DTB in place of baseline and overlays, the instance CPUs
//! offlined before the load (the RFC's start refuses an online CPU), no
//! halt command (stop uses the forced halt where the kernel has one, as
//! ours does, and refuses while active otherwise), `rmdir` to remove, and
//! release brings the offline CPUs back once no instance is left.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dtb::{self, DtNode, PoolChange, PoolChunk, PoolMemory};
use crate::units::{InstanceId, MemRange};

use super::iface::{Errno, KernelIface, KexecLoad, RebootCmd};
use super::probe::{InstanceState, MK_MOUNT};
use super::request::{BootPlan, PoolState};
use super::Generation;

/// Timing of the polls (status files do not notify).
#[derive(Debug, Clone)]
pub struct Options {
    pub poll_interval: Duration,
    /// How long a started instance may take to read `active`.
    pub start_timeout: Duration,
    /// How long a halted instance may take to stop before it is forced.
    pub halt_timeout: Duration,
    /// Kernel log lines kept in an error report.
    pub log_lines: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(100),
            start_timeout: Duration::from_secs(30),
            halt_timeout: Duration::from_secs(10),
            log_lines: 12,
        }
    }
}

/// What went wrong inside a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A call returned an errno.
    Call { call: String, errno: Errno },
    /// An overlay's transaction did not apply (the write itself succeeds).
    Overlay { tx: String, status: String },
    /// A status file holds what it must not.
    Status {
        path: PathBuf,
        got: String,
        want: String,
    },
    /// A status never reached what was awaited.
    Timeout {
        path: PathBuf,
        want: String,
        last: String,
        waited: Duration,
    },
    /// Anything else, said in words.
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Call { call, errno } => write!(f, "{call}: {errno} ({})", errno.desc()),
            Failure::Overlay { tx, status } => write!(
                f,
                "overlay transaction {tx} reads status \"{status}\", not \"applied\""
            ),
            Failure::Status { path, got, want } => {
                write!(f, "{} reads \"{got}\", expected \"{want}\"", path.display())
            }
            Failure::Timeout {
                path,
                want,
                last,
                waited,
            } => write!(
                f,
                "{} still reads \"{last}\" after {:.1}s, expected \"{want}\"",
                path.display(),
                waited.as_secs_f64()
            ),
            Failure::Other(s) => f.write_str(s),
        }
    }
}

/// A step failed. Earlier steps were undone (boot only); `rollback` says
/// how each undo went.
#[derive(Debug, Clone, thiserror::Error)]
#[error("step \"{step}\" failed: {failure}")]
pub struct StepError {
    pub step: String,
    pub failure: Box<Failure>,
    /// The kernel's last messages when the step failed, where readable.
    pub kernel_log: Vec<String>,
    /// One line per undo step, in the order run.
    pub rollback: Vec<String>,
}

impl StepError {
    /// The errno, when the step failed on a call.
    pub fn errno(&self) -> Option<Errno> {
        match &*self.failure {
            Failure::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The whole report for people: the failure, the kernel log, the
    /// rollback.
    pub fn render(&self) -> String {
        let mut s = format!("{self}\n");
        if !self.kernel_log.is_empty() {
            s.push_str("kernel log (last lines):\n");
            for l in &self.kernel_log {
                s.push_str(&format!("  {l}\n"));
            }
        }
        if !self.rollback.is_empty() {
            s.push_str("rolled back:\n");
            for l in &self.rollback {
                s.push_str(&format!("  {l}\n"));
            }
        }
        s
    }
}

/// What the kernel reports, read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusReport {
    /// `None` when the filesystem is not mounted.
    pub generation: Option<Generation>,
    pub pool: Option<PoolState>,
    pub instances: Vec<InstanceState>,
}

/// One way back from a step that succeeded.
#[derive(Debug, Clone)]
enum Undo {
    Umount,
    /// Give back whatever the pool holds (it was empty before).
    ReleasePool,
    /// Give back CPUs a pool overlay added, and the chunks it grew by.
    ShrinkPool {
        cpus: Vec<u64>,
        before: Vec<PoolChunk>,
    },
    RmdirTx(String),
    RmdirInstance(String),
    OnlineCpu(u32),
    Unload(String, InstanceId),
    ForceHalt(String, InstanceId),
}

/// Runs sequences against a kernel. `log` receives one line per step
/// event.
pub struct Engine<'a, K: KernelIface + ?Sized> {
    k: &'a mut K,
    sysroot: PathBuf,
    opts: Options,
    log: &'a mut dyn FnMut(&str),
}

impl<K: KernelIface + ?Sized> std::fmt::Debug for Engine<'_, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("sysroot", &self.sysroot)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl<'a, K: KernelIface + ?Sized> Engine<'a, K> {
    pub fn new(k: &'a mut K, sysroot: &Path, opts: Options, log: &'a mut dyn FnMut(&str)) -> Self {
        Self {
            k,
            sysroot: sysroot.to_path_buf(),
            opts,
            log,
        }
    }

    /// A path in the multikernel filesystem.
    pub fn mk(&self, rel: &str) -> PathBuf {
        let root = self.sysroot.join(MK_MOUNT);
        if rel.is_empty() {
            root
        } else {
            root.join(rel)
        }
    }

    // ---- calls, each turned into a Failure that names it ---------------

    fn write(&mut self, path: &Path, data: &[u8]) -> Result<(), Failure> {
        self.k
            .write_file(path, data)
            .map_err(|errno| Failure::Call {
                call: format!("write {} ({} bytes)", path.display(), data.len()),
                errno,
            })
    }

    fn read(&mut self, path: &Path) -> Result<String, Failure> {
        self.k
            .read_file(path)
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .map_err(|errno| Failure::Call {
                call: format!("read {}", path.display()),
                errno,
            })
    }

    fn read_dir(&mut self, path: &Path) -> Result<Vec<String>, Failure> {
        self.k.read_dir(path).map_err(|errno| Failure::Call {
            call: format!("readdir {}", path.display()),
            errno,
        })
    }

    fn rmdir(&mut self, path: &Path) -> Result<(), Failure> {
        self.k.rmdir(path).map_err(|errno| Failure::Call {
            call: format!("rmdir {}", path.display()),
            errno,
        })
    }

    fn kexec(&mut self, load: &KexecLoad) -> Result<(), Failure> {
        self.k.kexec_file_load(load).map_err(|errno| Failure::Call {
            call: load.to_string(),
            errno,
        })
    }

    fn reboot(&mut self, cmd: RebootCmd, id: InstanceId) -> Result<(), Failure> {
        self.k.reboot(cmd, id).map_err(|errno| Failure::Call {
            call: super::iface::Call::Reboot(cmd, id).to_string(),
            errno,
        })
    }

    // ---- steps ----------------------------------------------------------

    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Self) -> Result<T, Failure>,
    ) -> Result<T, StepError> {
        (self.log)(&format!("step: {name}"));
        match f(self) {
            Ok(v) => {
                (self.log)(&format!("  ok: {name}"));
                Ok(v)
            }
            Err(failure) => {
                (self.log)(&format!("  FAILED: {name}: {failure}"));
                let kernel_log = self.k.kernel_log_tail(self.opts.log_lines);
                Err(StepError {
                    step: name.to_string(),
                    failure: Box::new(failure),
                    kernel_log,
                    rollback: Vec::new(),
                })
            }
        }
    }

    /// The generation of the mounted filesystem, `None` when it is not
    /// mounted (told by whether it lists `device_tree`).
    fn mounted_generation(&mut self) -> Option<Generation> {
        let root = self.mk("");
        let names = self.k.read_dir(&root).ok()?;
        if !names.iter().any(|n| n == "device_tree") {
            return None;
        }
        Some(if names.iter().any(|n| n == "overlays") {
            Generation::Current
        } else {
            Generation::V1
        })
    }

    fn ensure_mounted(&mut self, undo: &mut Vec<Undo>) -> Result<Generation, StepError> {
        if let Some(g) = self.mounted_generation() {
            (self.log)(&format!(
                "multikernel filesystem already mounted ({g} interface)"
            ));
            return Ok(g);
        }
        let root = self.mk("");
        self.step("mount the multikernel filesystem", |e| {
            e.k.mount_multikernel(&root).map_err(|errno| Failure::Call {
                call: format!("mount -t multikernel none {}", root.display()),
                errno,
            })
        })?;
        undo.push(Undo::Umount);
        self.step("tell the interface generation", |e| {
            e.mounted_generation().ok_or_else(|| {
                Failure::Other(format!(
                    "{} holds no device_tree after the mount",
                    e.mk("").display()
                ))
            })
        })
    }

    fn read_pool(&mut self) -> Result<PoolState, Failure> {
        let path = self.mk("device_tree");
        let blob = self.k.read_file(&path).map_err(|errno| Failure::Call {
            call: format!("read {}", path.display()),
            errno,
        })?;
        PoolState::from_dtb(&blob).map_err(|e| Failure::Other(format!("{}: {e}", path.display())))
    }

    /// Writes an overlay and checks its transaction: a failed overlay
    /// still returns success from write(2), so the newest `tx_N/status`
    /// says (`kernel/multikernel/overlay.c` `mk_overlay_apply`).
    fn apply_overlay(&mut self, tree: &DtNode, cleanup_failed: bool) -> Result<String, Failure> {
        let blob = tree.to_dtb().map_err(|e| Failure::Other(e.to_string()))?;
        let new = self.mk("overlays/new");
        self.write(&new, &blob)?;
        let dir = self.mk("overlays");
        let tx = self
            .read_dir(&dir)?
            .into_iter()
            .filter_map(|n| {
                n.strip_prefix("tx_")
                    .and_then(|x| x.parse::<u64>().ok())
                    .map(|id| (id, n.clone()))
            })
            .max()
            .map(|(_, n)| n)
            .ok_or_else(|| {
                Failure::Other("overlay written but the kernel created no tx_N".into())
            })?;
        let status = self.read(&dir.join(&tx).join("status"))?;
        if status != "applied" {
            if cleanup_failed {
                // Rolling back a failed create is a no-op that removes
                // the transaction directory.
                let p = dir.join(&tx);
                let _ = self.k.rmdir(&p);
            }
            return Err(Failure::Overlay { tx, status });
        }
        Ok(tx)
    }

    fn poll(&mut self, path: &Path, want: &str, timeout: Duration) -> Result<(), Failure> {
        let mut waited = Duration::ZERO;
        loop {
            let got = self.read(path)?;
            if got == want {
                return Ok(());
            }
            if got == "failed" {
                return Err(Failure::Status {
                    path: path.to_path_buf(),
                    got,
                    want: want.into(),
                });
            }
            if waited >= timeout {
                return Err(Failure::Timeout {
                    path: path.to_path_buf(),
                    want: want.into(),
                    last: got,
                    waited,
                });
            }
            self.k.sleep(self.opts.poll_interval);
            waited += self.opts.poll_interval.max(Duration::from_millis(1));
        }
    }

    // ---- boot -------------------------------------------------------------

    /// Boots every target of `plan`. On failure, undoes what it did.
    pub fn boot(&mut self, plan: &BootPlan) -> Result<Generation, StepError> {
        (self.log)(&format!(
            "booting {} through the multikernel interface",
            plan.targets
                .iter()
                .map(|t| format!("\"{}\" (id {})", t.name, t.id))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for n in &plan.notes {
            (self.log)(&format!("note: {n}"));
        }
        let mut undo = Vec::new();
        match self.boot_steps(plan, &mut undo) {
            Ok(g) => {
                (self.log)("boot complete");
                Ok(g)
            }
            Err(mut e) => {
                e.rollback = self.rollback(undo);
                Err(e)
            }
        }
    }

    fn boot_steps(
        &mut self,
        plan: &BootPlan,
        undo: &mut Vec<Undo>,
    ) -> Result<Generation, StepError> {
        let generation = self.ensure_mounted(undo)?;
        match generation {
            Generation::Current => self.boot_current(plan, undo)?,
            Generation::V1 => self.boot_v1(plan, undo)?,
        }
        for t in &plan.targets {
            let status = self.mk(&format!("instances/{}/status", t.name));
            let load = KexecLoad::load(
                t.id,
                t.kernel_source(generation),
                t.initrd.clone(),
                t.cmdline.clone(),
            );
            let loaded = match generation {
                Generation::Current => "loaded",
                Generation::V1 => "loading",
            };
            self.step(&format!("load the kernel of \"{}\"", t.name), |e| {
                e.kexec(&load)?;
                Ok(())
            })?;
            undo.push(Undo::Unload(t.name.clone(), t.id));
            self.step(&format!("check \"{}\" is {loaded}", t.name), |e| {
                let got = e.read(&status)?;
                if got == loaded {
                    Ok(())
                } else {
                    Err(Failure::Status {
                        path: status.clone(),
                        got,
                        want: loaded.into(),
                    })
                }
            })?;
            self.step(&format!("start \"{}\"", t.name), |e| {
                e.reboot(RebootCmd::Start, t.id)
            })?;
            undo.push(Undo::ForceHalt(t.name.clone(), t.id));
            let timeout = self.opts.start_timeout;
            self.step(&format!("wait for \"{}\" to be active", t.name), |e| {
                e.poll(&status, "active", timeout)
            })?;
        }
        Ok(generation)
    }

    fn boot_current(&mut self, plan: &BootPlan, undo: &mut Vec<Undo>) -> Result<(), StepError> {
        let pool = self.step("read the pool", Self::read_pool)?;
        if pool.live {
            let change = missing_from_pool(&plan.pool, &pool);
            if change.is_empty() {
                (self.log)("the pool already holds what the instances need");
            } else {
                undo.push(Undo::ShrinkPool {
                    cpus: change.cpu_add.clone(),
                    before: pool.chunks.clone(),
                });
                let tree = dtb::pool_overlay(&change);
                self.step("add the missing CPUs and memory to the pool", |e| {
                    e.apply_overlay(&tree, false).map(|_| ())
                })?;
            }
        } else {
            let blob = plan
                .baseline()
                .to_dtb()
                .map_err(|e| self.plain_error("build the baseline", e.to_string()))?;
            // Pushed first: a baseline the kernel applied in part (it moves
            // resources one by one) is given back too.
            undo.push(Undo::ReleasePool);
            let path = self.mk("device_tree");
            self.step("write the baseline", |e| e.write(&path, &blob))?;
        }
        for t in &plan.targets {
            let tree = dtb::create_overlay(&t.create_request());
            let tx = self.step(&format!("create instance \"{}\"", t.name), |e| {
                e.apply_overlay(&tree, true)
            })?;
            undo.push(Undo::RmdirTx(tx));
        }
        if let Some(w) = plan.window {
            self.step("check the window is no instance's memory", |e| {
                e.check_window(&w)
            })?;
        }
        Ok(())
    }

    fn boot_v1(&mut self, plan: &BootPlan, undo: &mut Vec<Undo>) -> Result<(), StepError> {
        let blob = plan
            .v1_tree
            .to_dtb()
            .map_err(|e| self.plain_error("build the v1 device tree", e.to_string()))?;
        let path = self.mk("device_tree");
        // The RFC creates what it can and returns success regardless, so
        // every instance is looked up afterwards.
        for t in &plan.targets {
            undo.push(Undo::RmdirInstance(t.name.clone()));
        }
        self.step("write the v1 device tree", |e| e.write(&path, &blob))?;
        for t in &plan.targets {
            let status = self.mk(&format!("instances/{}/status", t.name));
            self.step(&format!("check \"{}\" is ready", t.name), |e| {
                let got = e.read(&status)?;
                if got == "ready" {
                    Ok(())
                } else {
                    Err(Failure::Status {
                        path: status.clone(),
                        got,
                        want: "ready".into(),
                    })
                }
            })?;
        }
        for t in &plan.targets {
            for cpu in t.cpus.iter() {
                let online = self
                    .sysroot
                    .join(format!("sys/devices/system/cpu/cpu{cpu}/online"));
                self.step(&format!("offline CPU {cpu} for \"{}\"", t.name), |e| {
                    e.write(&online, b"0")
                })?;
                undo.push(Undo::OnlineCpu(cpu));
            }
        }
        Ok(())
    }

    fn plain_error(&mut self, step: &str, what: String) -> StepError {
        StepError {
            step: step.into(),
            failure: Box::new(Failure::Other(what)),
            kernel_log: Vec::new(),
            rollback: Vec::new(),
        }
    }

    /// The window must not overlap memory the kernel gave an instance
    /// (`mk-instance-<id>-<name>-region-<n>` in `/proc/iomem`, kerf 0.4.0
    /// `resources.py`).
    fn check_window(&mut self, w: &MemRange) -> Result<(), Failure> {
        let iomem = self.sysroot.join("proc/iomem");
        let text = self.read(&iomem)?;
        for line in text.lines() {
            let Some((range, name)) = line.split_once(" : ") else {
                continue;
            };
            let name = name.trim();
            if !name.starts_with("mk-instance-") {
                continue;
            }
            let Some((a, b)) = range.trim().split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                continue;
            };
            let Some(r) = b
                .checked_add(1)
                .and_then(|end| MemRange::new(a, end.checked_sub(a)?))
            else {
                continue;
            };
            if r.overlaps(w) {
                return Err(Failure::Other(format!(
                    "the window {w} overlaps {r}, given to {name}; move [window] base out of the pool's instance memory"
                )));
            }
        }
        Ok(())
    }

    fn rollback(&mut self, undo: Vec<Undo>) -> Vec<String> {
        let mut out = Vec::new();
        for u in undo.into_iter().rev() {
            let (name, r) = match u {
                Undo::Umount => {
                    let root = self.mk("");
                    (
                        "unmount the multikernel filesystem".to_string(),
                        self.k.umount(&root).map_err(|errno| Failure::Call {
                            call: format!("umount {}", root.display()),
                            errno,
                        }),
                    )
                }
                Undo::ReleasePool => ("give the pool back to the host".into(), self.release_all()),
                Undo::ShrinkPool { cpus, before } => (
                    "take back what was added to the pool".into(),
                    self.shrink_pool(cpus, &before),
                ),
                Undo::RmdirTx(tx) => {
                    let p = self.mk(&format!("overlays/{tx}"));
                    (format!("roll back overlay {tx}"), self.rmdir(&p))
                }
                Undo::RmdirInstance(name) => {
                    let p = self.mk(&format!("instances/{name}"));
                    // Absent when the write never created it.
                    let r = match self.k.rmdir(&p) {
                        Err(Errno::ENOENT) => Ok(()),
                        r => r.map_err(|errno| Failure::Call {
                            call: format!("rmdir {}", p.display()),
                            errno,
                        }),
                    };
                    (format!("remove instance \"{name}\""), r)
                }
                Undo::OnlineCpu(cpu) => {
                    let p = self
                        .sysroot
                        .join(format!("sys/devices/system/cpu/cpu{cpu}/online"));
                    (format!("online CPU {cpu}"), self.write(&p, b"1"))
                }
                Undo::Unload(name, id) => (
                    format!("unload the kernel of \"{name}\""),
                    self.kexec(&KexecLoad::unload(id)),
                ),
                Undo::ForceHalt(name, id) => {
                    let status = self.mk(&format!("instances/{name}/status"));
                    let t = self.opts.halt_timeout;
                    let r = self
                        .reboot(RebootCmd::HaltForce, id)
                        .and_then(|()| self.poll_not(&status, "active", t));
                    (format!("force-halt \"{name}\""), r)
                }
            };
            let line = match r {
                Ok(()) => format!("ok: {name}"),
                Err(f) => format!("FAILED: {name}: {f}"),
            };
            (self.log)(&format!("rollback {line}"));
            out.push(line);
        }
        out
    }

    fn poll_not(&mut self, path: &Path, not: &str, timeout: Duration) -> Result<(), Failure> {
        let mut waited = Duration::ZERO;
        loop {
            let got = self.read(path)?;
            if got != not {
                return Ok(());
            }
            if waited >= timeout {
                return Err(Failure::Timeout {
                    path: path.to_path_buf(),
                    want: format!("anything but {not}"),
                    last: got,
                    waited,
                });
            }
            self.k.sleep(self.opts.poll_interval);
            waited += self.opts.poll_interval.max(Duration::from_millis(1));
        }
    }

    fn release_all(&mut self) -> Result<(), Failure> {
        let pool = self.read_pool()?;
        if !pool.live {
            return Ok(());
        }
        let change = PoolChange {
            cpu_remove: pool.cpus.clone(),
            memory_remove: pool.chunks.clone(),
            ..PoolChange::default()
        };
        self.apply_overlay(&dtb::pool_overlay(&change), false)?;
        let after = self.read_pool()?;
        if after.live && (!after.cpus.is_empty() || !after.chunks.is_empty()) {
            return Err(Failure::Other(format!(
                "the pool still holds CPUs {:?} and {} chunk(s) after the release",
                after.cpus,
                after.chunks.len()
            )));
        }
        Ok(())
    }

    fn shrink_pool(&mut self, cpus: Vec<u64>, before: &[PoolChunk]) -> Result<(), Failure> {
        let pool = self.read_pool()?;
        let change = PoolChange {
            cpu_remove: cpus.into_iter().filter(|c| pool.cpus.contains(c)).collect(),
            memory_remove: pool
                .chunks
                .iter()
                .filter(|c| !before.contains(c))
                .copied()
                .collect(),
            ..PoolChange::default()
        };
        if change.is_empty() {
            return Ok(());
        }
        self.apply_overlay(&dtb::pool_overlay(&change), false)
            .map(|_| ())
    }

    // ---- stop, release, status ---------------------------------------------

    /// Stops and removes the named instances: halt (forced after
    /// `halt_timeout`) → unload → remove. Nothing is undone on failure:
    /// the error names the step reached.
    pub fn stop(&mut self, names: &[String]) -> Result<(), StepError> {
        let generation = self.step("find the multikernel filesystem", |e| {
            e.mounted_generation().ok_or_else(|| {
                Failure::Other(format!(
                    "{} is not mounted: no instance runs",
                    e.mk("").display()
                ))
            })
        })?;
        for name in names {
            self.stop_one(generation, name)?;
        }
        Ok(())
    }

    fn stop_one(&mut self, generation: Generation, name: &str) -> Result<(), StepError> {
        let id_path = self.mk(&format!("instances/{name}/id"));
        let status_path = self.mk(&format!("instances/{name}/status"));
        let (id, mut status) = self.step(&format!("find instance \"{name}\""), |e| {
            let id = match e.read(&id_path) {
                Err(Failure::Call {
                    errno: Errno::ENOENT,
                    ..
                }) => {
                    return Err(Failure::Other(format!(
                        "the kernel has no instance \"{name}\""
                    )))
                }
                r => r?,
            };
            let id = id
                .parse::<u32>()
                .map_err(|_| Failure::Other(format!("{} reads \"{id}\"", id_path.display())))?;
            Ok((InstanceId(id), e.read(&status_path)?))
        })?;
        if status == "active" && generation == Generation::V1 {
            // The RFC v2 interface has no halt. A v1 kernel that has the
            // forced halt (ours, qemu/multikernel: INIT to the instance's
            // CPUs, back to `ready`) stops it that way; one without it
            // answers EINVAL (an unknown reboot command) and it runs on.
            let t = self.opts.halt_timeout;
            let forced = self.step(&format!("force-halt \"{name}\" (v1)"), |e| {
                match e.reboot(RebootCmd::HaltForce, id) {
                    Err(Failure::Call {
                        errno: Errno::EINVAL | Errno::EOPNOTSUPP,
                        ..
                    }) => Ok(false),
                    Err(f) => Err(f),
                    Ok(()) => e.poll_not(&status_path, "active", t).map(|()| true),
                }
            })?;
            if !forced {
                return Err(self.plain_error(
                    &format!("halt \"{name}\""),
                    "the v1 interface (RFC v2) has no halt command, and this kernel has no \
                     forced halt either (it answered EINVAL); an active v1 instance runs until \
                     the host reboots"
                        .into(),
                ));
            }
            status = self.step(&format!("read the status of \"{name}\""), |e| {
                e.read(&status_path)
            })?;
        }
        if status == "active" {
            let t = self.opts.halt_timeout;
            let halted = self.step(&format!("halt \"{name}\""), |e| {
                match e.reboot(RebootCmd::Halt, id) {
                    // The instance did not answer: force it below.
                    Err(Failure::Call {
                        errno: Errno::ETIMEDOUT,
                        ..
                    }) => return Ok(false),
                    r => r?,
                }
                match e.poll_not(&status_path, "active", t) {
                    Ok(()) => Ok(true),
                    Err(Failure::Timeout { .. }) => Ok(false),
                    Err(f) => Err(f),
                }
            })?;
            if !halted {
                (self.log)(&format!(
                    "\"{name}\" did not stop within {:.1}s; forcing it",
                    t.as_secs_f64()
                ));
                self.step(&format!("force-halt \"{name}\""), |e| {
                    e.reboot(RebootCmd::HaltForce, id)?;
                    e.poll_not(&status_path, "active", t)
                })?;
            }
            status = self.step(&format!("read the status of \"{name}\""), |e| {
                e.read(&status_path)
            })?;
        }
        if status == "loaded" || status == "loading" {
            self.step(&format!("unload the kernel of \"{name}\""), |e| {
                e.kexec(&KexecLoad::unload(id))
            })?;
        }
        match generation {
            Generation::Current => {
                let tree = dtb::remove_overlay(name);
                self.step(&format!("remove instance \"{name}\""), |e| {
                    e.apply_overlay(&tree, false).map(|_| ())
                })?;
            }
            Generation::V1 => {
                let dir = self.mk(&format!("instances/{name}"));
                self.step(&format!("remove instance \"{name}\""), |e| e.rmdir(&dir))?;
            }
        }
        Ok(())
    }

    /// v1 keeps no pool of its own: the memory stays reserved at boot
    /// (`mkkernel_pool=`), and the CPUs are the ones boot offlined for
    /// instances. With no instance left, every offline CPU comes back
    /// online (a CPU the kernel still holds for an instance refuses).
    fn release_v1_cpus(&mut self) -> Result<(), StepError> {
        let inst_dir = self.mk("instances");
        self.step("check no instance holds CPUs", |e| {
            let names = e.read_dir(&inst_dir)?;
            if names.is_empty() {
                Ok(())
            } else {
                Err(Failure::Other(format!(
                    "instance(s) {} still hold their CPUs: stop them first",
                    names.join(", ")
                )))
            }
        })?;
        let offline_path = self.sysroot.join("sys/devices/system/cpu/offline");
        let offline = self.step("read the offline CPUs", |e| {
            let text = match e.read(&offline_path) {
                Err(Failure::Call {
                    errno: Errno::ENOENT,
                    ..
                }) => String::new(),
                r => r?,
            };
            crate::units::CpuSet::parse(text.trim()).map_err(|why| {
                Failure::Other(format!(
                    "{} reads \"{text}\": {why}",
                    offline_path.display()
                ))
            })
        })?;
        if offline.is_empty() {
            (self.log)("every CPU is online: nothing to give back");
        }
        for cpu in offline.iter() {
            let p = self
                .sysroot
                .join(format!("sys/devices/system/cpu/cpu{cpu}/online"));
            self.step(&format!("online CPU {cpu}"), |e| e.write(&p, b"1"))?;
        }
        Ok(())
    }

    /// Gives every pool CPU and chunk back to the host (current
    /// generation), refusing while instances exist; then unmounts the
    /// filesystem when `unmount`. A no-op on an empty pool.
    pub fn release(&mut self, unmount: bool) -> Result<(), StepError> {
        let Some(generation) = self.mounted_generation() else {
            (self.log)("the multikernel filesystem is not mounted: nothing to release");
            return Ok(());
        };
        if generation == Generation::Current {
            let inst_dir = self.mk("instances");
            self.step("check no instance holds pool resources", |e| {
                let names = e.read_dir(&inst_dir)?;
                if names.is_empty() {
                    Ok(())
                } else {
                    Err(Failure::Other(format!(
                        "the pool still holds instance(s) {}: stop them first",
                        names.join(", ")
                    )))
                }
            })?;
            let pool = self.step("read the pool", Self::read_pool)?;
            if pool.live {
                self.step("give the pool back to the host", Self::release_all)?;
            } else {
                (self.log)("the pool is empty: nothing to give back");
            }
        } else {
            self.release_v1_cpus()?;
        }
        if unmount {
            let root = self.mk("");
            self.step("unmount the multikernel filesystem", |e| {
                e.k.umount(&root).map_err(|errno| Failure::Call {
                    call: format!("umount {}", root.display()),
                    errno,
                })
            })?;
        }
        Ok(())
    }

    /// The instances and pool as the kernel reports them. Reads only.
    pub fn status(&mut self) -> Result<StatusReport, StepError> {
        let Some(generation) = self.mounted_generation() else {
            return Ok(StatusReport::default());
        };
        let pool = if generation == Generation::Current {
            Some(self.step("read the pool", Self::read_pool)?)
        } else {
            None
        };
        let dir = self.mk("instances");
        let names = self.step("list instances", |e| e.read_dir(&dir))?;
        let mut instances = Vec::new();
        for name in names {
            let id_path = self.mk(&format!("instances/{name}/id"));
            let st_path = self.mk(&format!("instances/{name}/status"));
            let id = self.read(&id_path).ok().and_then(|s| s.parse().ok());
            let status = self.read(&st_path).ok();
            instances.push(InstanceState { name, id, status });
        }
        Ok(StatusReport {
            generation: Some(generation),
            pool,
            instances,
        })
    }
}

/// What a live pool lacks for `want`: CPUs not in it, and memory per node
/// beyond what its chunks hold.
pub fn missing_from_pool(want: &dtb::PoolRequest, pool: &PoolState) -> PoolChange {
    let cpu_add = want
        .cpus
        .iter()
        .filter(|c| !pool.cpus.contains(c))
        .copied()
        .collect();
    let memory_add = want
        .memory
        .iter()
        .filter_map(|m| {
            let have = pool.bytes_on(m.numa_node);
            (have < m.size).then(|| PoolMemory {
                size: m.size - have,
                numa_node: m.numa_node,
            })
        })
        .collect();
    PoolChange {
        cpu_add,
        memory_add,
        ..PoolChange::default()
    }
}
