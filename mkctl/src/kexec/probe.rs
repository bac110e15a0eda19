//! What the host offers the kexec backend, read from a sysroot without
//! touching anything: the multikernel filesystem (registered, mounted,
//! which generation, what it holds) and the two kernel options the backend
//! needs. [`preflight`] turns that into a go or a [`Refusal`].
//!
//! The kernel configuration comes from [`crate::host::kconfig`], the one
//! reader `mkctl host` uses too, so both always agree.

use std::fmt;
use std::path::Path;

use crate::topology::{Backend, Topology};

use super::Generation;

/// Where the multikernel filesystem lives (`kernel/multikernel/kernfs.c`:
/// `sysfs_create_mount_point(fs_kobj, "multikernel")`).
pub const MK_MOUNT: &str = "sys/fs/multikernel";

/// The multikernel filesystem as seen under a sysroot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsState {
    /// `/sys/fs/multikernel` exists (the kernel creates it when built with
    /// `CONFIG_MULTIKERNEL`).
    pub mount_point: bool,
    /// `multikernel` is listed in `/proc/filesystems`.
    pub registered: bool,
    /// `/proc/mounts` has a `multikernel` mount there.
    pub mounted: bool,
    /// Told by what the mounted filesystem holds (`overlays/` = current).
    pub generation: Option<Generation>,
    /// `instances/<name>/{id,status}`.
    pub instances: Vec<InstanceState>,
    /// `/proc/kimage` exists: every kernel of the two generations mkctl
    /// speaks creates it at boot (RFC v2 patch 11/16, `kernel/kexec_core.c`);
    /// the instance-descriptor generation (multikernel/linux v7.0-mk5, kerf
    /// 0.6.0) removed it.
    pub kimage: bool,
}

impl FsState {
    /// The multikernel filesystem is there but `/proc/kimage` is not: the
    /// instance-descriptor generation, which mkctl recognises and does not
    /// speak (see [`DESCRIPTORS_UNSUPPORTED`]).
    pub fn descriptor_interface(&self) -> bool {
        (self.mount_point || self.registered) && !self.kimage
    }
}

/// Why the instance-descriptor generation is refused, for every message
/// that refuses it.
pub const DESCRIPTORS_UNSUPPORTED: &str = "this kernel has the multikernel filesystem but no \
     /proc/kimage: it speaks the instance-descriptor interface of multikernel/linux v7.0-mk5 \
     and kerf 0.6.0 (kexec_file_load returns an instance descriptor; start and halt are \
     ioctls on it; the reboot() commands are gone). mkctl does not support that generation \
     yet: its uAPI (ioctl numbers, argument layouts) is published nowhere mkctl's authors \
     could read. Only the v1 (RFC v2) and current (v7.0-mk2 to mk4) interfaces are spoken";

/// One instance as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceState {
    pub name: String,
    pub id: Option<u32>,
    /// `empty`, `ready`, `loaded` (`loading` in v1), `active`, `failed`.
    pub status: Option<String>,
}

/// Reads the multikernel filesystem's state under `sysroot`.
pub fn probe(sysroot: &Path) -> FsState {
    let mk = sysroot.join(MK_MOUNT);
    let registered = std::fs::read_to_string(sysroot.join("proc/filesystems"))
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some("multikernel"))
        })
        .unwrap_or(false);
    let mounted = std::fs::read_to_string(sysroot.join("proc/mounts"))
        .map(|s| {
            s.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 3 && f[1] == "/sys/fs/multikernel" && f[2] == "multikernel"
            })
        })
        .unwrap_or(false);
    let generation = mounted.then(|| {
        if mk.join("overlays").is_dir() {
            Generation::Current
        } else {
            Generation::V1
        }
    });
    let mut instances = Vec::new();
    if let Ok(rd) = std::fs::read_dir(mk.join("instances")) {
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let dir = mk.join("instances").join(&name);
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .ok()
                    .map(|s| s.trim().to_string())
            };
            instances.push(InstanceState {
                id: read("id").and_then(|s| s.parse().ok()),
                status: read("status"),
                name,
            });
        }
    }
    FsState {
        mount_point: mk.is_dir(),
        registered,
        mounted,
        generation,
        instances,
        kimage: sysroot.join("proc/kimage").exists(),
    }
}

/// Why the kexec backend will not run here. Nothing was touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The instances that asked for `backend = "kexec"`.
    pub instances: Vec<String>,
    /// What is missing, one item each.
    pub missing: Vec<String>,
    /// The interface is there but of a generation mkctl does not speak (a
    /// dry run against the model of another generation would mislead).
    pub unsupported_generation: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cannot boot {} with backend = \"kexec\": this host has no Linux multikernel interface{}",
            self.instances
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", "),
            if self.unsupported_generation {
                " mkctl speaks"
            } else {
                ""
            }
        )?;
        for m in &self.missing {
            writeln!(f, "  - {m}")?;
        }
        if self.unsupported_generation {
            return write!(
                f,
                "Nothing was changed. Boot a host kernel of the v1 or current generation, \
                 or set backend = \"qemu\" for these instances to run them as QEMU guests."
            );
        }
        write!(
            f,
            "Nothing was changed. Boot a host kernel built from GitHub multikernel/linux \
             (tag v7.0-mk2 or later) with CONFIG_MULTIKERNEL=y and CONFIG_KEXEC_FILE=y, \
             or set backend = \"qemu\" for these instances (in [defaults] or per instance) \
             to run them as QEMU guests."
        )
    }
}

impl std::error::Error for Refusal {}

/// Checks, before anything is touched, that the host can boot the
/// topology's `kexec` instances; lists everything missing at once. A
/// topology without kexec instances passes. Returns the generation when
/// the filesystem is mounted already.
pub fn preflight(sysroot: &Path, topology: &Topology) -> Result<Option<Generation>, Refusal> {
    let instances: Vec<String> = topology
        .instances
        .iter()
        .filter(|i| i.backend == Backend::Kexec)
        .map(|i| i.name.clone())
        .collect();
    if instances.is_empty() {
        return Ok(None);
    }
    let fs = probe(sysroot);
    if fs.descriptor_interface() {
        return Err(Refusal {
            instances,
            missing: vec![DESCRIPTORS_UNSUPPORTED.to_string()],
            unsupported_generation: true,
        });
    }
    let config = crate::host::kconfig::read(sysroot);
    let mut missing = Vec::new();
    if !fs.mount_point && !fs.registered {
        missing.push(
            "the multikernel filesystem: /sys/fs/multikernel does not exist and \
             /proc/filesystems does not list \"multikernel\""
                .to_string(),
        );
    }
    match &config {
        Some(c) => {
            for opt in crate::host::kconfig::KEXEC_BACKEND_OPTIONS {
                if !c.enabled(opt) {
                    missing.push(format!("{opt} is not set ({})", c.source.display()));
                }
            }
        }
        None if !missing.is_empty() => missing.push(
            "the kernel configuration (neither /proc/config.gz nor /boot/config-<release> \
             is readable) to confirm CONFIG_MULTIKERNEL and CONFIG_KEXEC_FILE"
                .to_string(),
        ),
        None => {}
    }
    if !cfg!(target_arch = "x86_64") {
        missing.push(format!(
            "x86_64: mkctl maps CPUs to x86 APIC ids only, and this is {}",
            std::env::consts::ARCH
        ));
    }
    if missing.is_empty() {
        Ok(fs.generation)
    } else {
        Err(Refusal {
            instances,
            missing,
            unsupported_generation: false,
        })
    }
}
