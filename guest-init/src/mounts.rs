//! The pseudo filesystems PID 1 mounts before anything else: `/proc`, `/sys`,
//! `/dev` (devtmpfs, so device nodes such as `/dev/mem` appear by themselves),
//! `/dev/pts`, `/dev/shm`, `/tmp` and `/run`.
//!
//! Mount points are created when missing. A filesystem already mounted there
//! (EBUSY) counts as done, so running the list twice is harmless.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// One mount guest-init makes.
#[derive(Debug, Clone, Copy)]
pub struct MountSpec {
    /// Filesystem type (and source name).
    pub fstype: &'static str,
    /// Mount point, absolute.
    pub target: &'static str,
    /// Mount flags.
    pub flags: MsFlags,
    /// Filesystem options.
    pub data: &'static str,
    /// Whether the guest cannot go on without it (`/proc`, `/sys`, `/dev`).
    pub required: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The mounts, in order (parents before children).
pub const MOUNTS: &[MountSpec] = &[
    MountSpec {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        required: true,
    },
    MountSpec {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        required: true,
    },
    MountSpec {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
        required: true,
    },
    MountSpec {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "mode=0620,ptmxmode=0666",
        required: false,
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
        required: false,
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
        required: false,
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755",
        required: false,
    },
];

/// A mount that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot mount {fstype} on {}", target.display())]
pub struct MountError {
    /// Filesystem type.
    pub fstype: &'static str,
    /// Mount point.
    pub target: PathBuf,
    /// Whether the guest can go on without it.
    pub required: bool,
    /// What the kernel said.
    #[source]
    pub source: std::io::Error,
}

/// Mounts one filesystem, creating its mount point first.
pub fn mount_one(spec: &MountSpec) -> Result<(), MountError> {
    let fail = |source: std::io::Error| MountError {
        fstype: spec.fstype,
        target: PathBuf::from(spec.target),
        required: spec.required,
        source,
    };
    let target = Path::new(spec.target);
    std::fs::create_dir_all(target).map_err(fail)?;
    let data = (!spec.data.is_empty()).then_some(spec.data);
    match mount(
        Some(spec.fstype),
        target,
        Some(spec.fstype),
        spec.flags,
        data,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(fail(e.into())),
    }
}

/// Mounts everything in [`MOUNTS`]. Stops at the first required mount that
/// fails; optional failures are returned for the caller to report.
pub fn mount_all() -> Result<Vec<MountError>, MountError> {
    let mut soft = Vec::new();
    for spec in MOUNTS {
        match mount_one(spec) {
            Ok(()) => {}
            Err(e) if e.required => return Err(e),
            Err(e) => soft.push(e),
        }
    }
    Ok(soft)
}
