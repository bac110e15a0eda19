//! Host discovery: what this machine has (CPUs, NUMA nodes, RAM, APIC ids)
//! and what is already reserved (`memmap=` carve-outs, crash kernel,
//! isolated CPUs, the multikernel pool and instances), plus whether the
//! `kexec` backend can work here.
//!
//! It only reads. It never writes, mounts, onlines or offlines anything:
//! every file it opens is under a root prefix (`sysroot`, `/` on a real
//! host) so tests and `mkctl host --sysroot` run it against fake trees.
//! Only `cpu/online`, `cpu/possible` and `/proc/meminfo` are essential;
//! anything else that is missing or malformed leaves its part empty and
//! adds a line to [`HostInfo::warnings`].
//!
//! Files read, all relative to the sysroot:
//! - `sys/devices/system/cpu/{online,possible,present,isolated,nohz_full}`
//! - `sys/devices/system/node/node*/{cpulist,meminfo,memory*}`,
//!   `sys/devices/system/memory/{block_size_bytes,memory*/state}`
//! - `proc/{meminfo,iomem,cmdline,cpuinfo,mounts,filesystems}`
//! - `sys/fs/multikernel/{overlays,device_tree,instances/*/{id,status}}`
//! - `proc/sys/kernel/osrelease`, `boot/config-<release>` (and notes
//!   `proc/config.gz`)

pub mod cmdline;
pub mod kconfig;
pub mod multikernel;
pub mod procfs;
mod render;
pub mod sysfs;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use cmdline::{CmdlineReservations, CrashKernel, CrashSpec, Memmap, MemmapKind, MkPool};
pub use multikernel::{Generation, McInstance, MultikernelState};
pub use procfs::Iomem;
pub use sysfs::{CpuInfo, NumaNode};

use crate::units::{ByteSize, CpuSet, MemRange};
use cmdline::ReservedAs;

/// Why discovery could not describe the host at all.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// An essential file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An essential file was read but makes no sense.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

/// Everything discovery found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostInfo {
    /// The root every path was read under.
    pub sysroot: PathBuf,
    /// `proc/sys/kernel/osrelease`.
    pub kernel_release: Option<String>,
    pub cpus: CpuInfo,
    /// Ascending by id; one node 0 on a kernel without NUMA.
    pub nodes: Vec<NumaNode>,
    /// `MemTotal` of `/proc/meminfo`: RAM the host kernel manages.
    pub mem_total: ByteSize,
    /// Top-level `System RAM` of `/proc/iomem`; empty when its addresses
    /// were hidden (see `iomem_hidden`).
    pub ram: Vec<MemRange>,
    /// `/proc/iomem` was read without root and showed every address as 0.
    pub iomem_hidden: bool,
    /// Memory set aside, ascending: from `/proc/iomem` and from the command
    /// line, one entry per region with the evidence for it.
    pub reserved: Vec<Reservation>,
    pub cmdline: CmdlineReservations,
    /// Logical CPU -> APIC id (the multikernel interface names CPUs by
    /// physical APIC id). Offline CPUs are missing: `/proc/cpuinfo` lists
    /// online CPUs only.
    pub apic_ids: BTreeMap<u32, u32>,
    pub multikernel: MultikernelState,
    pub kernel_config: KernelConfig,
    /// Whether the `kexec` backend can run here.
    pub kexec: KexecVerdict,
    /// What could not be read or made sense of, and what that leaves unknown.
    pub warnings: Vec<String>,
}

/// One reserved memory region.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reservation {
    pub range: MemRange,
    pub kind: ReservationKind,
    /// The name `/proc/iomem` gives it, when it lists it.
    pub iomem: Option<String>,
    /// The command-line option(s) that asked for it.
    pub cmdline: Option<String>,
}

/// What a reserved region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationKind {
    /// e820 reserved: firmware, or `memmap=nn$ss`.
    Reserved,
    /// Legacy persistent memory (`memmap=nn!ss`, e820 type 12).
    PersistentMemory,
    /// ACPI data set by `memmap=nn#ss`.
    AcpiData,
    /// `crashkernel=`: the kdump kernel's memory.
    CrashKernel,
    /// The multikernel RFC's pool (`mkkernel_pool=`).
    MultikernelPool,
    /// EFI specific-purpose memory ("Soft Reserved").
    SoftReserved,
}

impl ReservationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationKind::Reserved => "reserved",
            ReservationKind::PersistentMemory => "persistent memory",
            ReservationKind::AcpiData => "ACPI data",
            ReservationKind::CrashKernel => "crash kernel",
            ReservationKind::MultikernelPool => "multikernel pool",
            ReservationKind::SoftReserved => "soft reserved",
        }
    }
}

/// A kernel config option's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigValue {
    /// `=y`
    Yes,
    /// `=m`
    Module,
    /// `# ... is not set`, or not in the config at all.
    No,
    /// Any other value, as written.
    Other(String),
    /// No readable kernel config.
    Unknown,
}

impl ConfigValue {
    fn from_text(v: &str) -> Self {
        match v {
            "y" => ConfigValue::Yes,
            "m" => ConfigValue::Module,
            "n" => ConfigValue::No,
            other => ConfigValue::Other(other.to_string()),
        }
    }
}

impl fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Yes => f.write_str("y"),
            ConfigValue::Module => f.write_str("m"),
            ConfigValue::No => f.write_str("n"),
            ConfigValue::Other(v) => f.write_str(v),
            ConfigValue::Unknown => f.write_str("unknown"),
        }
    }
}

impl serde::Serialize for ConfigValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The kernel config options the `kexec` backend depends on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelConfig {
    /// The config file the values come from; `None` when none was readable.
    pub source: Option<PathBuf>,
    pub multikernel: ConfigValue,
    /// `multikernel` was not read from a config file but inferred from
    /// `/proc/filesystems` listing the `multikernel` filesystem.
    pub multikernel_inferred: bool,
    pub kexec_file: ConfigValue,
}

/// Whether the `kexec` backend can work on this host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KexecVerdict {
    /// The interface is there and mounted. `unchecked` names what could
    /// not be verified (a kernel config option no readable config showed).
    Ready {
        generation: Generation,
        unchecked: Vec<String>,
    },
    /// The interface is there but `/sys/fs/multikernel` is not mounted yet.
    NeedsMount,
    /// Something the backend needs is missing; each entry says what.
    Unavailable { missing: Vec<String> },
}

impl KexecVerdict {
    pub fn is_usable(&self) -> bool {
        !matches!(self, KexecVerdict::Unavailable { .. })
    }
}

impl fmt::Display for KexecVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KexecVerdict::Ready {
                generation,
                unchecked,
            } => {
                write!(
                    f,
                    "kexec backend: usable ({} mounted, interface generation {})",
                    multikernel::MOUNT_POINT,
                    generation.as_str()
                )?;
                if !unchecked.is_empty() {
                    write!(f, "; not checked: {}", unchecked.join(", "))?;
                }
                Ok(())
            }
            KexecVerdict::NeedsMount => write!(
                f,
                "kexec backend: usable once {0} is mounted (mount -t multikernel none {0})",
                multikernel::MOUNT_POINT
            ),
            KexecVerdict::Unavailable { missing } => write!(
                f,
                "kexec backend: unavailable: {}; use backend = \"qemu\"",
                missing.join("; ")
            ),
        }
    }
}

impl HostInfo {
    /// Reads the host under `sysroot` (`/` for the running machine).
    pub fn discover(sysroot: &Path) -> Result<HostInfo, HostError> {
        let root = Root { dir: sysroot };
        let mut warnings = Vec::new();

        let cpus = sysfs::read_cpus(&root, &mut warnings)?;
        let mem_total = read_mem_total(&root)?;

        let iomem = root
            .read_optional(
                "proc/iomem",
                &mut warnings,
                "RAM and reserved regions unknown",
            )
            .map(|t| Iomem::parse(&t, &mut warnings))
            .unwrap_or_default();
        if iomem.addresses_hidden {
            warnings.push(format!(
                "{} shows every address as 0: run as root to see physical addresses \
                 (RAM unknown; reserved regions come from the command line only)",
                root.path("proc/iomem").display()
            ));
        }
        let ram = iomem.system_ram();

        let cmdline = root
            .read_optional(
                "proc/cmdline",
                &mut warnings,
                "memmap=, isolcpus=, nohz_full= and crashkernel= unknown",
            )
            .map(|t| CmdlineReservations::parse(&t, cpus.last_possible(), &mut warnings))
            .unwrap_or_default();

        let apic_ids = read_apic_ids(&root, &cpus, &mut warnings);
        let nodes = sysfs::read_nodes(&root, &cpus, &ram, mem_total, &mut warnings);
        let multikernel = multikernel::read(&root, &mut warnings);
        let kernel_release = root
            .read_optional(
                "proc/sys/kernel/osrelease",
                &mut warnings,
                "kernel release and /boot config unknown",
            )
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let kernel_config = read_kernel_config(
            &root,
            kernel_release.as_deref(),
            &multikernel,
            &mut warnings,
        );

        let system_ram = if ram.is_empty() {
            mem_total.0
        } else {
            ram.iter().map(MemRange::size).sum()
        };
        let reserved = reservations(&iomem, &cmdline, system_ram, &root, &mut warnings);
        let kexec = kexec_verdict(
            &multikernel,
            &kernel_config,
            &cmdline,
            &reserved,
            iomem.addresses_hidden || iomem.entries.is_empty(),
        );

        Ok(HostInfo {
            sysroot: sysroot.to_path_buf(),
            kernel_release,
            cpus,
            nodes,
            mem_total,
            ram,
            iomem_hidden: iomem.addresses_hidden,
            reserved,
            cmdline,
            apic_ids,
            multikernel,
            kernel_config,
            kexec,
            warnings,
        })
    }

    /// Regions set aside at boot that no kernel uses, natural places for a
    /// pool: `memmap=nn$ss` / `nn!ss` carve-outs the command line asked for,
    /// and the multikernel pool. Ascending.
    pub fn free_pool_candidates(&self) -> Vec<MemRange> {
        self.reserved
            .iter()
            .filter(|r| match r.kind {
                ReservationKind::MultikernelPool => true,
                ReservationKind::Reserved | ReservationKind::PersistentMemory => r
                    .cmdline
                    .as_deref()
                    .is_some_and(|c| c.starts_with("memmap=")),
                _ => false,
            })
            .map(|r| r.range)
            .collect()
    }

    /// All CPUs of all nodes.
    pub fn node_cpus(&self) -> CpuSet {
        self.nodes
            .iter()
            .fold(CpuSet::new(), |acc, n| acc.union(&n.cpus))
    }

    /// The report for people (`mkctl host`).
    pub fn render(&self) -> String {
        render::render(self)
    }
}

/// Reads files under the sysroot.
#[derive(Debug, Clone, Copy)]
struct Root<'a> {
    dir: &'a Path,
}

impl Root<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel.trim_start_matches('/'))
    }

    fn read(&self, rel: &str) -> io::Result<String> {
        std::fs::read_to_string(self.path(rel))
    }

    fn read_essential(&self, rel: &str) -> Result<String, HostError> {
        self.read(rel).map_err(|source| HostError::Read {
            path: self.path(rel),
            source,
        })
    }

    /// Reads a file whose absence leaves `unknown` unknown (said in a warning).
    fn read_optional(
        &self,
        rel: &str,
        warnings: &mut Vec<String>,
        unknown: &str,
    ) -> Option<String> {
        match self.read(rel) {
            Ok(t) => Some(t),
            Err(e) => {
                warnings.push(format!("{}: {unknown}", unreadable(&self.path(rel), &e)));
                None
            }
        }
    }

    /// Reads a cpulist file. A missing file warns only when `expected`; a
    /// malformed one always does.
    fn read_cpuset(&self, rel: &str, warnings: &mut Vec<String>, expected: bool) -> Option<CpuSet> {
        let text = match self.read(rel) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !expected => return None,
            Err(e) => {
                warnings.push(unreadable(&self.path(rel), &e));
                return None;
            }
        };
        match CpuSet::parse(&text) {
            Ok(c) => Some(c),
            Err(m) => {
                warnings.push(format!("{}: {m}; ignored", self.path(rel).display()));
                None
            }
        }
    }
}

/// "no /x" for a missing file, else "cannot read /x (why)": for warnings,
/// which have no `source()` chain to print the cause.
fn unreadable(path: &Path, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!("no {}", path.display()),
        io::ErrorKind::PermissionDenied => {
            format!("cannot read {} (permission denied)", path.display())
        }
        _ => format!("cannot read {} ({e})", path.display()),
    }
}

fn read_mem_total(root: &Root) -> Result<ByteSize, HostError> {
    let text = root.read_essential("proc/meminfo")?;
    procfs::parse_meminfo(&text)
        .get("MemTotal")
        .copied()
        .filter(|&v| v > 0)
        .map(ByteSize)
        .ok_or_else(|| HostError::Parse {
            path: root.path("proc/meminfo"),
            message: "no \"MemTotal: <n> kB\" line".into(),
        })
}

fn read_apic_ids(root: &Root, cpus: &CpuInfo, warnings: &mut Vec<String>) -> BTreeMap<u32, u32> {
    let Some(text) = root.read_optional(
        "proc/cpuinfo",
        warnings,
        "APIC ids (the multikernel interface's CPU names) unknown",
    ) else {
        return BTreeMap::new();
    };
    let map = procfs::parse_cpuinfo_apic_ids(&text, warnings);
    if map.is_empty() {
        warnings.push(format!(
            "{} has no apicid lines (not x86?): APIC ids unknown",
            root.path("proc/cpuinfo").display()
        ));
        return map;
    }
    let listed = CpuSet::from_cpus(map.keys().copied());
    let offline_missing = cpus.offline.difference(&listed);
    if !offline_missing.is_empty() {
        warnings.push(format!(
            "CPU(s) {offline_missing} offline: /proc/cpuinfo lists online CPUs only, \
             so their APIC ids are unknown"
        ));
    }
    let online_missing = cpus.online.difference(&listed);
    if !online_missing.is_empty() {
        warnings.push(format!(
            "online CPU(s) {online_missing} have no apicid in {}",
            root.path("proc/cpuinfo").display()
        ));
    }
    map
}

fn read_kernel_config(
    root: &Root,
    _release: Option<&str>,
    mk: &MultikernelState,
    warnings: &mut Vec<String>,
) -> KernelConfig {
    let mut cfg = KernelConfig {
        source: None,
        multikernel: ConfigValue::Unknown,
        multikernel_inferred: false,
        kexec_file: ConfigValue::Unknown,
    };
    // One reader for /proc/config.gz and /boot/config-<release>: the one
    // the kexec backend's preflight uses, so both always agree.
    match kconfig::read(root.dir) {
        Some(k) => {
            let value = |name: &str| match k.options.get(name) {
                Some(v) => ConfigValue::from_text(v),
                None => ConfigValue::No,
            };
            cfg.multikernel = value("CONFIG_MULTIKERNEL");
            cfg.kexec_file = value("CONFIG_KEXEC_FILE");
            cfg.source = Some(k.source);
        }
        None => {
            warnings.push(
                "kernel config unknown (neither /proc/config.gz nor /boot/config-<release> is readable): \
                 CONFIG_MULTIKERNEL and CONFIG_KEXEC_FILE not checked"
                    .into(),
            );
            if mk.fs_registered == Some(true) {
                cfg.multikernel = ConfigValue::Yes;
                cfg.multikernel_inferred = true;
            }
        }
    }
    cfg
}

/// Merges what `/proc/iomem` shows reserved with what the command line
/// asked for; a request the kernel did not honour is a warning.
fn reservations(
    iomem: &Iomem,
    cmdline: &CmdlineReservations,
    system_ram: u64,
    root: &Root,
    warnings: &mut Vec<String>,
) -> Vec<Reservation> {
    let visible = !iomem.addresses_hidden && !iomem.entries.is_empty();
    let mut out: Vec<Reservation> = Vec::new();
    if visible {
        for e in &iomem.entries {
            let kind = match (e.depth, e.name.as_str()) {
                (0, n) if n.eq_ignore_ascii_case("reserved") => ReservationKind::Reserved,
                (0, n) if n.starts_with("Persistent Memory") => ReservationKind::PersistentMemory,
                (0, "Soft Reserved") => ReservationKind::SoftReserved,
                (_, n) if n.starts_with("Crash kernel") => ReservationKind::CrashKernel,
                (_, "Multikernel Memory Pool") => ReservationKind::MultikernelPool,
                _ => continue,
            };
            out.push(Reservation {
                range: e.range,
                kind,
                iomem: Some(e.name.clone()),
                cmdline: None,
            });
        }
    }

    // (option text, kind, range if the option fixes one)
    let mut asked: Vec<(String, ReservationKind, Option<MemRange>)> = Vec::new();
    for m in &cmdline.memmap {
        if let Some((range, how)) = m.kind.reservation() {
            let kind = match how {
                ReservedAs::Reserved => ReservationKind::Reserved,
                ReservedAs::Persistent => ReservationKind::PersistentMemory,
                ReservedAs::AcpiData => ReservationKind::AcpiData,
            };
            asked.push((m.text.clone(), kind, Some(range)));
        }
    }
    for c in &cmdline.crashkernel {
        if c.spec.size_for(system_ram).is_none() {
            continue; // a ranges form that reserves nothing on this much RAM
        }
        asked.push((
            c.text.clone(),
            ReservationKind::CrashKernel,
            c.spec.fixed_range(system_ram),
        ));
    }
    if let Some(p) = &cmdline.mkkernel_pool {
        asked.push((p.text.clone(), ReservationKind::MultikernelPool, p.range()));
    }

    for (text, kind, range) in asked {
        let fits =
            |r: &Reservation| r.kind == kind && range.is_none_or(|want| r.range.contains(&want));
        // `,high` and `,low` each claim their own "Crash kernel" line.
        let found = out
            .iter()
            .position(|r| fits(r) && r.cmdline.is_none())
            .or_else(|| out.iter().position(fits));
        match (found, range) {
            (Some(i), _) => {
                let r = &mut out[i];
                r.cmdline = Some(match r.cmdline.take() {
                    Some(prev) => format!("{prev} {text}"),
                    None => text,
                });
            }
            (None, Some(range)) => {
                // `memmap=nn#ss` shows up as "ACPI Tables", which firmware
                // tables also use; only a matching line counts.
                let iomem_name = (visible && kind == ReservationKind::AcpiData)
                    .then(|| {
                        iomem
                            .entries
                            .iter()
                            .find(|e| {
                                e.depth == 0 && e.name == "ACPI Tables" && e.range.contains(&range)
                            })
                            .map(|e| e.name.clone())
                    })
                    .flatten();
                if visible && iomem_name.is_none() {
                    warnings.push(format!(
                        "{text} asks for {} {range} but {} shows none there \
                         (did the kernel reject it?)",
                        kind.as_str(),
                        root.path("proc/iomem").display()
                    ));
                }
                out.push(Reservation {
                    range,
                    kind,
                    iomem: iomem_name,
                    cmdline: Some(text),
                });
            }
            (None, None) => {
                if visible {
                    warnings.push(format!(
                        "{text} asks for a {} but {} shows none (did the kernel reject it?)",
                        kind.as_str(),
                        root.path("proc/iomem").display()
                    ));
                }
            }
        }
    }
    out.sort_by_key(|r| (r.range.start, r.range.end));
    out
}

fn kexec_verdict(
    mk: &MultikernelState,
    cfg: &KernelConfig,
    cmdline: &CmdlineReservations,
    reserved: &[Reservation],
    iomem_unknown: bool,
) -> KexecVerdict {
    let mp = multikernel::MOUNT_POINT;
    let mut missing = Vec::new();
    if !mk.present {
        if cfg.multikernel == ConfigValue::Yes && !cfg.multikernel_inferred {
            missing.push(format!(
                "no {mp} although CONFIG_MULTIKERNEL=y (is sysfs mounted at /sys?)"
            ));
        } else {
            missing.push(format!("no {mp}: this kernel lacks CONFIG_MULTIKERNEL"));
        }
    }
    if cfg.kexec_file == ConfigValue::No {
        missing.push("CONFIG_KEXEC_FILE is not set: no kexec_file_load".into());
    }
    if mk.generation == Some(Generation::Descriptors) {
        missing.push(format!(
            "{mp} is there but /proc/kimage is not: this kernel speaks the \
             instance-descriptor interface of multikernel v7.0-mk5 / kerf 0.6.0, \
             which mkctl does not support yet"
        ));
    } else if mk.present {
        if let Some(other) = &mk.other_mount {
            missing.push(format!("{mp} has a {other} filesystem mounted on it"));
        } else if mk.mounted && mk.generation.is_none() {
            missing.push(format!(
                "mounted {mp} has neither overlays/ nor device_tree: unknown interface generation"
            ));
        }
        let has_pool = cmdline.mkkernel_pool.is_some()
            || reserved
                .iter()
                .any(|r| r.kind == ReservationKind::MultikernelPool);
        if mk.generation == Some(Generation::V1) && !has_pool && !iomem_unknown {
            missing.push(
                "no multikernel memory pool: boot the host with mkkernel_pool=<size>@<address>"
                    .into(),
            );
        }
    }
    if !missing.is_empty() {
        return KexecVerdict::Unavailable { missing };
    }
    let mut unchecked = Vec::new();
    if cfg.kexec_file == ConfigValue::Unknown {
        unchecked.push("CONFIG_KEXEC_FILE (kernel config unknown)".to_string());
    }
    match (mk.mounted, mk.generation) {
        (true, Some(generation)) => KexecVerdict::Ready {
            generation,
            unchecked,
        },
        _ => KexecVerdict::NeedsMount,
    }
}
