//! From a validated topology to what the kexec backend will write: the
//! pool baseline, one create overlay per instance, the v1 tree, the kernel
//! images and command lines. Everything is checked here, before the first
//! kernel call, and every problem is reported at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::dtb::{
    self, DtNode, DtbParseError, InstanceRequest, PoolChunk, PoolMemory, PoolRequest,
    MAX_BASELINE_BYTES, MAX_OVERLAY_BYTES,
};
use crate::topology::{Backend, Instance, Topology};
use crate::units::{ByteSize, CpuSet, InstanceId, MemRange};

use super::iface::KernelSource;
use super::{image, Generation};
use crate::qemu::cmdline::{endpoint_names, GuestCmdline};

/// x86 `COMMAND_LINE_SIZE` (`arch/x86/include/uapi/asm/setup.h`), NUL
/// included.
pub const COMMAND_LINE_SIZE: usize = 2048;
/// Page size the kernel checks sizes against (`PAGE_ALIGNED` in
/// `kernel/multikernel/dts.c` and `baseline.c`).
pub const PAGE_SIZE: u64 = 4096;

/// The files an instance boots from, resolved by the caller (`auto`
/// images are the CLI's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
}

/// One instance, ready to boot.
#[derive(Debug, Clone)]
pub struct BootTarget {
    pub name: String,
    pub id: InstanceId,
    /// Logical CPU numbers (the v1 tree, CPU offlining in v1).
    pub cpus: CpuSet,
    /// Physical ids of the same CPUs (the current interface).
    pub apic: Vec<u64>,
    pub memory_bytes: u64,
    pub memory: MemRange,
    pub memory_base_given: bool,
    pub numa_node: Option<u32>,
    pub kernel: PathBuf,
    /// The ELF vmlinux when `kernel` is a bzImage.
    pub vmlinux: Option<Arc<Vec<u8>>>,
    pub initrd: Option<PathBuf>,
    /// The full command line passed (console and window added).
    pub cmdline: String,
}

impl BootTarget {
    /// The current interface's instance-create request.
    pub fn create_request(&self) -> InstanceRequest {
        InstanceRequest {
            name: self.name.clone(),
            id: self.id,
            cpus: self.apic.clone(),
            memory_bytes: self.memory_bytes,
            numa_node: self.numa_node,
        }
    }

    /// What `kexec_file_load` gets: the extracted ELF for the current
    /// interface (its loader takes ELF only), the file as given for v1 (a
    /// stock kernel's `kexec_file_load` takes the bzImage).
    pub fn kernel_source(&self, generation: Generation) -> KernelSource {
        KernelSource {
            path: self.kernel.clone(),
            extracted: match generation {
                Generation::Current => self.vmlinux.clone(),
                Generation::V1 => None,
            },
        }
    }
}

/// Everything a boot will write.
#[derive(Debug, Clone)]
pub struct BootPlan {
    /// What the baseline gives the pool: the CPUs of every kexec instance
    /// of the topology and the `[pool]` memory, per NUMA node.
    pub pool: PoolRequest,
    /// The v1 device tree of the instances to boot.
    pub v1_tree: DtNode,
    pub targets: Vec<BootTarget>,
    pub window: Option<MemRange>,
    /// Things a person should know that do not stop the boot.
    pub notes: Vec<String>,
}

impl BootPlan {
    /// The baseline tree.
    pub fn baseline(&self) -> DtNode {
        dtb::current_baseline(&self.pool)
    }
}

/// The topology asks for something the kexec backend cannot do; every
/// problem is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot boot through the multikernel interface:\n  - {}", problems.join("\n  - "))]
pub struct PlanError {
    pub problems: Vec<String>,
}

/// Finds an instance's kernel and initrd.
pub type ResolveImages<'a> = dyn Fn(&Instance) -> Result<Images, String> + 'a;

/// Builds the plan for the kexec instances named in `only` (all of them
/// when empty). `apic` maps logical CPU numbers to APIC ids (host.rs reads
/// it from `/proc/cpuinfo`); `images` resolves each instance's files.
pub fn plan_boot(
    t: &Topology,
    only: &[String],
    apic: &BTreeMap<u32, u32>,
    images: &dyn Fn(&Instance) -> Result<Images, String>,
) -> Result<BootPlan, PlanError> {
    plan(t, only, apic, Some(images))
}

/// The plan's device trees only (`mkctl dtb --abi current`): no kernel or
/// initrd is looked at, so the targets carry no images and must not be
/// booted.
pub fn plan_trees(
    t: &Topology,
    only: &[String],
    apic: &BTreeMap<u32, u32>,
) -> Result<BootPlan, PlanError> {
    plan(t, only, apic, None)
}

fn plan(
    t: &Topology,
    only: &[String],
    apic: &BTreeMap<u32, u32>,
    images: Option<&ResolveImages<'_>>,
) -> Result<BootPlan, PlanError> {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for n in only {
        match t.instance(n) {
            None => problems.push(format!("the topology has no instance \"{n}\"")),
            Some(i) if i.backend != Backend::Kexec => problems.push(format!(
                "instance \"{n}\" uses backend = \"{}\", not \"kexec\"",
                i.backend
            )),
            Some(_) => {}
        }
    }
    let kexec: Vec<&Instance> = t
        .instances
        .iter()
        .filter(|i| i.backend == Backend::Kexec)
        .collect();
    let selected: Vec<&Instance> = kexec
        .iter()
        .copied()
        .filter(|i| only.is_empty() || only.contains(&i.name))
        .collect();
    if selected.is_empty() && problems.is_empty() {
        problems.push("no instance with backend = \"kexec\" to boot".into());
    }

    let to_apic = |i: &Instance, problems: &mut Vec<String>| -> Vec<u64> {
        let mut v = Vec::new();
        for c in i.cpus.iter() {
            match apic.get(&c) {
                Some(&a) => v.push(u64::from(a)),
                None => problems.push(format!(
                    "instance \"{}\": CPU {c} has no APIC id on this host (is it present?)",
                    i.name
                )),
            }
        }
        v
    };

    // The pool takes the CPUs of every kexec instance, so instances can be
    // booted one at a time against one baseline.
    let mut pool_cpus: Vec<u64> = Vec::new();
    for i in &kexec {
        let mut scratch = Vec::new();
        pool_cpus.extend(to_apic(i, &mut scratch));
    }
    pool_cpus.sort_unstable();
    pool_cpus.dedup();
    let pool = PoolRequest {
        cpus: pool_cpus,
        memory: pool_memory(t),
    };
    if pool.memory.iter().any(|m| m.size % PAGE_SIZE != 0) {
        problems.push(format!(
            "the pool size {} is not a multiple of the 4 KiB page",
            t.pool.range.size()
        ));
    }

    let mut targets = Vec::new();
    for i in &selected {
        let name = &i.name;
        if i.id.0 == 0 || i.id.0 > InstanceId::MAX {
            problems.push(format!(
                "instance \"{name}\": id {} is outside 1..={} (0 is the host)",
                i.id,
                InstanceId::MAX
            ));
        }
        if i.cpus.contains(0) {
            problems.push(format!(
                "instance \"{name}\": CPU 0 boots the host and can never be given away"
            ));
        }
        let apic_ids = to_apic(i, &mut problems);
        if apic_ids.contains(&0) && !i.cpus.contains(0) {
            problems.push(format!(
                "instance \"{name}\": its CPUs include APIC id 0, the boot CPU"
            ));
        }
        let memory_bytes = i.memory.size();
        if memory_bytes == 0 || memory_bytes % PAGE_SIZE != 0 {
            problems.push(format!(
                "instance \"{name}\": memory {memory_bytes} bytes is not a positive multiple of 4 KiB"
            ));
        }
        if i.memory_base_given {
            notes.push(format!(
                "instance \"{name}\": memory_base {:#x} is honoured by the v1 interface only; \
                 the current one places instance memory in the pool itself",
                i.memory.start.0
            ));
        }
        let imgs = match images.map(|f| f(i)) {
            Some(Ok(x)) => x,
            Some(Err(e)) => {
                problems.push(format!("instance \"{name}\": {e}"));
                continue;
            }
            None => Images {
                kernel: std::path::PathBuf::new(),
                initrd: None,
            },
        };
        let prepared = if images.is_some() {
            image::prepare_elf(&imgs.kernel)
        } else {
            Ok(None)
        };
        let vmlinux = match prepared {
            Ok(v) => v.map(Arc::new),
            Err(e) => {
                problems.push(format!(
                    "instance \"{name}\": kernel {}: {}",
                    imgs.kernel.display(),
                    crate::error_chain(&e)
                ));
                None
            }
        };
        if let Some(p) = &imgs.initrd {
            if !p.is_file() {
                problems.push(format!(
                    "instance \"{name}\": initrd {} is not a readable file",
                    p.display()
                ));
            }
        }
        let mut base = i.cmdline.trim().to_string();
        // kerf adds the multikernel console unless one is named.
        if !base.split_whitespace().any(|w| w.starts_with("console=")) {
            push_word(&mut base, "console=mktty0");
        }
        // The same mk.* keys as under QEMU: guest-init needs its id and name.
        let mut mk = GuestCmdline::new(name, i.id)
            .base(&base)
            .peers(endpoint_names(t));
        if let Some(w) = &t.window.range {
            mk = mk.window(w.start, ByteSize(w.size()));
        }
        let cmdline = mk.to_string();
        if cmdline.len() + 1 > COMMAND_LINE_SIZE {
            problems.push(format!(
                "instance \"{name}\": the command line is {} bytes, past the kernel's {COMMAND_LINE_SIZE}",
                cmdline.len() + 1
            ));
        }
        let target = BootTarget {
            name: name.clone(),
            id: i.id,
            cpus: i.cpus.clone(),
            apic: apic_ids,
            memory_bytes,
            memory: i.memory,
            memory_base_given: i.memory_base_given,
            numa_node: i.numa_node,
            kernel: imgs.kernel,
            vmlinux,
            initrd: imgs.initrd,
            cmdline,
        };
        match dtb::create_overlay(&target.create_request()).to_dtb() {
            Ok(b) if b.len() > MAX_OVERLAY_BYTES => problems.push(format!(
                "instance \"{name}\": its create overlay is {} bytes, past the one-page limit of {MAX_OVERLAY_BYTES}",
                b.len()
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("instance \"{name}\": {e}")),
        }
        targets.push(target);
    }
    match dtb::current_baseline(&pool).to_dtb() {
        Ok(b) if b.len() > MAX_BASELINE_BYTES => problems.push(format!(
            "the baseline is {} bytes, past the kernel's {MAX_BASELINE_BYTES}",
            b.len()
        )),
        Ok(_) => {}
        Err(e) => problems.push(e.to_string()),
    }
    if !problems.is_empty() {
        return Err(PlanError { problems });
    }
    Ok(BootPlan {
        pool,
        v1_tree: dtb::v1_tree(t, selected.iter().copied()),
        targets,
        window: t.window.range,
        notes,
    })
}

fn push_word(s: &mut String, w: &str) {
    if !s.is_empty() {
        s.push(' ');
    }
    s.push_str(w);
}

/// The `[pool]` memory as per-node requests: the bytes of the pool range
/// each NUMA node's memory holds, or one request on no node when the
/// machine description does not place the range.
pub fn pool_memory(t: &Topology) -> Vec<PoolMemory> {
    let range = t.pool.range;
    let mut per_node: Vec<PoolMemory> = Vec::new();
    for n in &t.machine.nodes {
        let bytes: u64 = n
            .memory
            .iter()
            .filter(|m| m.overlaps(&range))
            .map(|m| m.end.0.min(range.end.0) - m.start.0.max(range.start.0))
            .sum();
        if bytes > 0 {
            per_node.push(PoolMemory {
                size: bytes,
                numa_node: Some(n.id),
            });
        }
    }
    if per_node.iter().map(|m| m.size).sum::<u64>() == range.size() {
        per_node
    } else {
        vec![PoolMemory {
            size: range.size(),
            numa_node: None,
        }]
    }
}

/// The pool as the kernel reports it in the read-back of `device_tree`
/// (`kernel/multikernel/dts.c` `mk_dt_generate_instance_dtb` for the host;
/// kerf 0.4.0 `init/main.py` `pool_is_live`): before a baseline, `cpus`
/// lists the host's own CPUs and there is no `memory@`; a live pool has
/// `cpus-available` and `memory@N { reg; numa-node-id; }` chunks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolState {
    pub live: bool,
    /// Pool members (free or lent), physical ids.
    pub cpus: Vec<u64>,
    /// Members not lent to an instance.
    pub free_cpus: Option<Vec<u64>>,
    pub chunks: Vec<PoolChunk>,
}

impl PoolState {
    /// Reads the kernel's read-back of `device_tree`.
    pub fn from_dtb(blob: &[u8]) -> Result<Self, DtbParseError> {
        let root = dtb::parse_dtb(blob)?;
        let Some(res) = root.sub("resources") else {
            return Ok(Self::default());
        };
        let cpus = res.get("cpus").and_then(cpu_cells).unwrap_or_default();
        let free_cpus = res.get("cpus-available").and_then(cpu_cells);
        let mut chunks = Vec::new();
        for c in res
            .children
            .iter()
            .filter(|c| c.name.starts_with("memory@"))
        {
            let Some(reg) = c.get("reg").and_then(|v| v.as_u64s()) else {
                continue;
            };
            if let [base, size] = reg[..] {
                chunks.push(PoolChunk {
                    base,
                    size,
                    numa_node: c
                        .get("numa-node-id")
                        .and_then(|v| v.as_u32s())
                        .and_then(|v| v.first().copied()),
                });
            }
        }
        Ok(Self {
            live: free_cpus.is_some() || !chunks.is_empty(),
            cpus,
            free_cpus,
            chunks,
        })
    }

    /// Bytes of pool memory on `node` (`None`: all nodes).
    pub fn bytes_on(&self, node: Option<u32>) -> u64 {
        self.chunks
            .iter()
            .filter(|c| node.is_none() || c.numa_node == node)
            .map(|c| c.size)
            .sum()
    }
}

/// `cpus` cells: 64-bit now, 32-bit in trees written before the widening
/// (kerf 0.4.0 `dtc/cells.py`).
fn cpu_cells(v: &dtb::DtValue) -> Option<Vec<u64>> {
    let b = v.to_bytes();
    if b.len().is_multiple_of(8) {
        v.as_u64s()
    } else {
        v.as_u32s().map(|x| x.into_iter().map(u64::from).collect())
    }
}
