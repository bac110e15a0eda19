//! The kexec backend's commands: boot, stop, status and console of
//! `backend = "kexec"` instances, `pool release`, and `dtb --abi current`.
//! The kernel holds this backend's state (`/sys/fs/multikernel`) and this
//! command drives it itself. The daemon holds the host's end of the
//! instances' window (`daemon::server::kexec`): a boot asks it to format
//! the window and attach endpoint 0 before the kernel starts anything, and
//! waits through it for each instance's agent afterwards.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::{Failure, Res, EXIT_FAIL, EXIT_OK, EXIT_USAGE};
use crate::daemon::client::Client;
use crate::daemon::control::{Reply, Request};
use crate::daemon::paths::{self, RunDir};
use crate::kexec::{self, fake::ScriptedKernel, request::Images, Engine, Options, RealKernel};
use crate::topology::{Backend, ImageSpec, Instance, Topology};

/// Logical CPU → APIC id for the machine, from host discovery; CPUs the
/// host does not list (another machine's topology, offline CPUs) fall back
/// to their own number, with a warning.
pub(super) fn apic_map(sysroot: &Path, t: &Topology) -> BTreeMap<u32, u32> {
    let mut map = crate::host::HostInfo::discover(sysroot)
        .map(|h| h.apic_ids)
        .unwrap_or_default();
    let unknown: Vec<u32> = t
        .instances
        .iter()
        .flat_map(|i| i.cpus.iter())
        .filter(|c| !map.contains_key(c))
        .collect();
    if !unknown.is_empty() {
        let set = crate::units::CpuSet::from_cpus(unknown.iter().copied());
        eprintln!(
            "mkctl: warning: the APIC ids of CPUs {set} are not known on this host; using the CPU numbers (run on the target machine, or pass --sysroot with its /proc/cpuinfo)"
        );
        for c in unknown {
            map.insert(c, c);
        }
    }
    map
}

/// Kernel and initrd for a kexec instance: "auto" ("auto-6.12") is the
/// cached stock kernel (of that series) and the initramfs mkctl builds
/// around guest-init.
fn images(scratch: &Path) -> impl Fn(&Instance) -> Result<Images, String> + '_ {
    move |i: &Instance| {
        let kernel = match &i.kernel {
            ImageSpec::Auto => paths::auto_kernel(),
            ImageSpec::AutoSeries(k) => paths::series_kernel(*k),
            ImageSpec::Path(p) => p.clone(),
        };
        let initrd = match &i.initrd {
            ImageSpec::Path(p) => Some(p.clone()),
            // Validation gives initrd no series: "auto".
            ImageSpec::Auto | ImageSpec::AutoSeries(_) => {
                let out = scratch.join("initramfs.cpio");
                if !out.is_file() {
                    let ir = crate::initramfs::Initramfs::for_guest(&paths::guest_init())
                        .map_err(|e| crate::error_chain(&e))?;
                    ir.write_file(&out).map_err(|e| crate::error_chain(&e))?;
                }
                Some(out)
            }
        };
        Ok(Images { kernel, initrd })
    }
}

/// Boots the topology's kexec instances in `only` (all when empty).
/// Without the interface: the refusal and exit 1, nothing touched; with
/// `dry_run`, the exact sequence against a model of the host.
pub(super) fn boot(
    sysroot: &Path,
    config: &Path,
    t: &Topology,
    only: &[String],
    timeout: u64,
    dry_run: bool,
) -> Res {
    let refusal = kexec::preflight(sysroot, t).err();
    if let Some(r) = refusal
        .as_ref()
        .filter(|r| !dry_run || r.unsupported_generation)
    {
        eprintln!("mkctl: {r}");
        return Ok(EXIT_FAIL);
    }
    let apic = apic_map(sysroot, t);
    let scratch = tempfile::tempdir()?;
    let plan = match kexec::plan_boot(t, only, &apic, &images(scratch.path())) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mkctl: {}", crate::error_chain(&e));
            return Ok(EXIT_FAIL);
        }
    };
    for n in &plan.notes {
        eprintln!("mkctl: note: {n}");
    }
    let mut log = |line: &str| eprintln!("[kexec] {line}");
    if dry_run {
        if let Some(r) = &refusal {
            eprintln!("mkctl: note (dry run goes on against a model of a multikernel host): {r}");
        }
        let fs = kexec::probe(sysroot);
        let host_cpus: Vec<u64> = apic.values().map(|&a| u64::from(a)).collect();
        let model = ScriptedKernel::from_probe(sysroot, &fs, host_cpus);
        let mut k = kexec::dryrun::DryRun::new(model, std::io::stdout());
        let r = Engine::new(&mut k, sysroot, Options::default(), &mut log).boot(&plan);
        return Ok(match r {
            Ok(g) => {
                println!(
                    "dry run: the {g} interface would boot {} instance(s); nothing was changed",
                    plan.targets.len()
                );
                EXIT_OK
            }
            Err(e) => {
                eprint!("{}", e.render());
                EXIT_FAIL
            }
        });
    }
    let names: Vec<String> = plan.targets.iter().map(|t| t.name.clone()).collect();
    // The window first: a spawned kernel's guest-init opens it as soon as
    // it runs. Without one the daemon is not involved.
    let hosted = match plan.window {
        Some(_) => match window_host(config, &names) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("mkctl: {e}; nothing was booted");
                return Ok(EXIT_FAIL);
            }
        },
        None => {
            eprintln!(
                "mkctl: note: the topology has no [window] base: the instances get no window and no agent link"
            );
            false
        }
    };
    let mut k = RealKernel;
    let r = Engine::new(&mut k, sysroot, Options::default(), &mut log).boot(&plan);
    let (booted, reason) = match &r {
        Ok(g) => {
            println!("{} active (multikernel {g} interface)", names.join(", "));
            (true, String::new())
        }
        Err(e) => {
            eprint!("{}", e.render());
            (
                false,
                "its kexec boot failed (see mkctl boot's report)".to_string(),
            )
        }
    };
    if !hosted {
        return Ok(if booted { EXIT_OK } else { EXIT_FAIL });
    }
    // One request per connection.
    let mut c = Client::connect(&RunDir::from_env())?;
    let reply = c.call(
        &Request::KexecBooted {
            instances: names,
            booted,
            reason,
            timeout_ms: timeout.saturating_mul(1000),
        },
        super::live::progress,
    )?;
    match reply {
        Reply::Ok { message } if booted => {
            println!("{message}");
            Ok(EXIT_OK)
        }
        Reply::Ok { .. } => Ok(EXIT_FAIL),
        other => Err(super::live::refused(other).into()),
    }
}

/// The daemon (started when none runs), asked to host the window of the
/// kexec instances `names` of `config`.
fn window_host(config: &Path, names: &[String]) -> Result<(), Failure> {
    let run = RunDir::from_env();
    let config = std::fs::canonicalize(config)
        .map_err(|e| Failure::Failed(format!("{}: {e}", config.display())))?;
    let failed = |e: &dyn std::error::Error| Failure::Failed(crate::error_chain(e));
    let mut c =
        Client::connect_or_start(&run, |m| eprintln!("mkctl: {m}")).map_err(|e| failed(&e))?;
    let reply = c
        .call(
            &Request::KexecPrepare {
                config,
                instances: names.to_vec(),
            },
            super::live::progress,
        )
        .map_err(|e| failed(&e))?;
    match reply {
        Reply::Ok { message } => {
            eprintln!("mkctl: {message}");
            Ok(())
        }
        other => Err(Failure::Failed(format!(
            "the daemon cannot host the window: {}",
            super::live::refused(other)
        ))),
    }
}

/// On a kernel of the instance-descriptor generation: says why nothing is
/// done (dry run or not: the model speaks the older generations) and
/// returns true.
fn refuse_descriptors(sysroot: &Path, what: &str) -> bool {
    if !kexec::probe(sysroot).descriptor_interface() {
        return false;
    }
    eprintln!(
        "mkctl: cannot {what}: {}. Nothing was changed.",
        kexec::probe::DESCRIPTORS_UNSUPPORTED
    );
    true
}

/// Instances the multikernel filesystem lists (empty when there is none).
pub(super) fn listed(sysroot: &Path) -> Vec<kexec::InstanceState> {
    kexec::probe(sysroot).instances
}

/// Stops kexec instances by name: halt, force after a timeout, unload,
/// remove.
pub(super) fn stop(sysroot: &Path, names: &[String], dry_run: bool) -> Res {
    if refuse_descriptors(sysroot, "stop") {
        return Ok(EXIT_FAIL);
    }
    let mut log = |line: &str| eprintln!("[kexec] {line}");
    let r = if dry_run {
        let fs = kexec::probe(sysroot);
        let model = ScriptedKernel::from_probe(sysroot, &fs, Vec::new());
        let mut k = kexec::dryrun::DryRun::new(model, std::io::stdout());
        Engine::new(&mut k, sysroot, Options::default(), &mut log).stop(names)
    } else {
        let mut k = RealKernel;
        Engine::new(&mut k, sysroot, Options::default(), &mut log).stop(names)
    };
    match r {
        Ok(()) => {
            println!("stopped {}", names.join(", "));
            Ok(EXIT_OK)
        }
        Err(e) => {
            eprint!("{}", e.render());
            Ok(EXIT_FAIL)
        }
    }
}

/// `mkctl pool release`: gives the pool's CPUs and memory back to the host.
pub(super) fn release(sysroot: &Path, unmount: bool, dry_run: bool) -> Res {
    if refuse_descriptors(sysroot, "release the pool") {
        return Ok(EXIT_FAIL);
    }
    let fs = kexec::probe(sysroot);
    if !fs.mount_point && !fs.registered && !dry_run {
        eprintln!("mkctl: this host has no multikernel interface (/sys/fs/multikernel): there is no pool to release");
        return Ok(EXIT_FAIL);
    }
    let mut log = |line: &str| eprintln!("[kexec] {line}");
    let r = if dry_run {
        let model = ScriptedKernel::from_probe(sysroot, &fs, Vec::new());
        let mut k = kexec::dryrun::DryRun::new(model, std::io::stdout());
        Engine::new(&mut k, sysroot, Options::default(), &mut log).release(unmount)
    } else {
        let mut k = RealKernel;
        Engine::new(&mut k, sysroot, Options::default(), &mut log).release(unmount)
    };
    match r {
        Ok(()) => {
            println!("the pool's CPUs and memory are back with the host");
            Ok(EXIT_OK)
        }
        Err(e) => {
            eprint!("{}", e.render());
            Ok(EXIT_FAIL)
        }
    }
}

/// `dtb --abi current`: the baseline, or one instance's create overlay.
/// Every instance of the file is compiled, whatever its backend.
pub(super) fn current_tree(
    sysroot: &Path,
    t: &Topology,
    overlay: Option<&str>,
) -> Result<crate::dtb::DtNode, i32> {
    let mut all = t.clone();
    for i in &mut all.instances {
        i.backend = Backend::Kexec;
    }
    if let Some(name) = overlay {
        if all.instance(name).is_none() {
            let names: Vec<&str> = all.instances.iter().map(|i| i.name.as_str()).collect();
            eprintln!(
                "mkctl: no instance \"{name}\"; the topology has: {}",
                names.join(", ")
            );
            return Err(EXIT_USAGE);
        }
    }
    let apic = apic_map(sysroot, &all);
    let plan = kexec::request::plan_trees(&all, &[], &apic).map_err(|e| {
        eprintln!("mkctl: {}", crate::error_chain(&e));
        EXIT_FAIL
    })?;
    Ok(match overlay {
        None => plan.baseline(),
        Some(name) => {
            let target = plan
                .targets
                .iter()
                .find(|x| x.name == name)
                .expect("checked above");
            crate::dtb::create_overlay(&target.create_request())
        }
    })
}

/// Copies a kexec instance's console (`/dev/mktty`) to the terminal.
pub(super) fn console(sysroot: &Path, id: u32) -> Res {
    let id = crate::units::InstanceId(id);
    let mut f = kexec::console::open(sysroot, id)?;
    let mut out = std::io::stdout();
    std::io::copy(&mut f, &mut out)?;
    out.flush()?;
    Ok(EXIT_OK)
}

/// True when the topology asks for any kexec instance among `only`.
pub(super) fn wants_kexec(t: &Topology, only: &[String]) -> bool {
    t.instances
        .iter()
        .any(|i| i.backend == Backend::Kexec && (only.is_empty() || only.contains(&i.name)))
}
