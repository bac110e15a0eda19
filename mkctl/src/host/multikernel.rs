//! The Linux multikernel interface as this host offers it:
//! `/sys/fs/multikernel`, its mount, its generation and its instances.

use super::procfs::{lists_filesystem, mounted_fstype};
use super::Root;

/// Where the interface lives (the path the kernel creates and `/proc/mounts`
/// names, independent of the sysroot).
pub const MOUNT_POINT: &str = "/sys/fs/multikernel";
const FSTYPE: &str = "multikernel";
/// Every kernel of the v1 (RFC v2 patch 11/16) and current generations
/// creates it at boot; the instance-descriptor generation dropped it.
pub const KIMAGE: &str = "proc/kimage";

/// Which generation of the interface a mounted `/sys/fs/multikernel` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Generation {
    /// The current tree and kerf 0.4: a host baseline written to
    /// `device_tree`, then one overlay per change to `overlays/new`.
    Current,
    /// The LKML RFC v2 series: one `multikernel-v1` DTB written to
    /// `device_tree`, no `overlays/`.
    V1,
    /// multikernel/linux v7.0-mk5 and kerf 0.6.0: `kexec_file_load()`
    /// returns an instance descriptor, start and halt are ioctls on it, the
    /// `reboot()` commands and `/proc/kimage` are gone. Recognised (by the
    /// missing `/proc/kimage`, which both older generations create at boot)
    /// but not supported: its uAPI is not published where mkctl could read it.
    Descriptors,
}

impl Generation {
    /// `current` or `v1`.
    pub fn as_str(self) -> &'static str {
        match self {
            Generation::Current => "current",
            Generation::V1 => "v1",
            Generation::Descriptors => "descriptors",
        }
    }

    /// What tells this generation apart, for reports.
    pub fn evidence(self) -> &'static str {
        match self {
            Generation::Current => "has overlays/",
            Generation::V1 => "device_tree without overlays/",
            Generation::Descriptors => "no /proc/kimage: multikernel v7.0-mk5 or later",
        }
    }
}

/// One instance directory, `instances/<name>/{id,status}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct McInstance {
    pub name: String,
    /// `None` when `id` is missing or not a number (a warning says which).
    pub id: Option<u32>,
    /// `empty`, `ready`, `loaded` (`loading` in v1), `active` or `failed`.
    pub status: Option<String>,
}

/// What `/sys/fs/multikernel` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MultikernelState {
    /// The directory exists (the kernel has `CONFIG_MULTIKERNEL`).
    pub present: bool,
    /// `/proc/mounts` lists it with fstype `multikernel`.
    pub mounted: bool,
    /// What else is mounted there, if something other than `multikernel`.
    pub other_mount: Option<String>,
    /// `/proc/filesystems` lists `multikernel`; `None` when unreadable.
    pub fs_registered: Option<bool>,
    /// Known from the directory's contents: `overlays/` means current,
    /// `device_tree` alone means v1. `None` when neither is there (for
    /// example, not mounted yet). `descriptors` whenever `/proc/kimage` is
    /// missing, mounted or not.
    pub generation: Option<Generation>,
    pub instances: Vec<McInstance>,
}

/// Reads `/sys/fs/multikernel` under `sysroot` alone, without the rest of
/// host discovery (`mkctl doctor`); also returns what could not be read.
pub fn discover(sysroot: &std::path::Path) -> (MultikernelState, Vec<String>) {
    let mut warnings = Vec::new();
    let state = read(&Root { dir: sysroot }, &mut warnings);
    (state, warnings)
}

pub(super) fn read(root: &Root, warnings: &mut Vec<String>) -> MultikernelState {
    let rel = MOUNT_POINT.trim_start_matches('/');
    let dir = root.path(rel);
    let mut st = MultikernelState {
        present: dir.is_dir(),
        fs_registered: root
            .read("proc/filesystems")
            .ok()
            .map(|t| lists_filesystem(&t, FSTYPE)),
        ..MultikernelState::default()
    };
    if !st.present {
        return st;
    }
    match root.read("proc/mounts") {
        Ok(m) => match mounted_fstype(&m, MOUNT_POINT) {
            Some(t) if t == FSTYPE => st.mounted = true,
            Some(t) => st.other_mount = Some(t),
            None => {}
        },
        Err(e) => warnings.push(format!(
            "{}: whether {MOUNT_POINT} is mounted is unknown",
            super::unreadable(&root.path("proc/mounts"), &e)
        )),
    }
    st.generation = if !root.path(KIMAGE).exists() {
        Some(Generation::Descriptors)
    } else if dir.join("overlays").is_dir() {
        Some(Generation::Current)
    } else if dir.join("device_tree").exists() {
        Some(Generation::V1)
    } else {
        None
    };
    let inst_dir = dir.join("instances");
    let mut names: Vec<String> = match std::fs::read_dir(&inst_dir) {
        Ok(rd) => rd
            .filter_map(|e| {
                let e = e.ok()?;
                e.path()
                    .is_dir()
                    .then(|| e.file_name().to_string_lossy().into_owned())
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    for name in names {
        let base = format!("{rel}/instances/{name}");
        let id = root.read(&format!("{base}/id")).ok().and_then(|t| {
            let v = t.trim().parse::<u32>().ok();
            if v.is_none() {
                warnings.push(format!(
                    "{}: \"{}\" is not an instance id",
                    root.path(&format!("{base}/id")).display(),
                    t.trim()
                ));
            }
            v
        });
        let status = root
            .read(&format!("{base}/status"))
            .ok()
            .map(|t| t.trim().to_string());
        st.instances.push(McInstance { name, id, status });
    }
    st
}
