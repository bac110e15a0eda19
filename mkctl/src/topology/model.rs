//! The validated topology: what every later stage (plan, DTB, backends)
//! consumes. Values here have passed every rule of `validate`, and every
//! instance has a concrete memory range (given, or placed in the pool).

use std::path::PathBuf;

use super::diag::{Diagnostic, Source};
use super::schema::Backend;
use crate::units::{ByteSize, CpuSet, InstanceId, MemRange, PhysAddr};

/// A partitioned machine, ready to boot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Topology {
    #[serde(skip)]
    pub source: Source,
    pub machine: Machine,
    pub host: HostShare,
    pub pool: Pool,
    pub window: WindowSpec,
    pub instances: Vec<Instance>,
    /// Extra files every guest's initramfs holds: (guest path, host file).
    pub files: Vec<(String, PathBuf)>,
    /// Findings that do not make the topology invalid.
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
}

/// The machine being partitioned: its NUMA nodes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    /// True when the file had no `[machine]` and it was read from the host.
    pub discovered: bool,
    pub nodes: Vec<Node>,
}

impl Machine {
    /// The running machine as host discovery saw it: each NUMA node with
    /// its present CPUs and its memory ranges.
    pub fn from_host(h: &crate::host::HostInfo) -> Machine {
        let nodes = h
            .nodes
            .iter()
            .map(|n| Node {
                id: n.id,
                cpus: n.cpus.intersection(&h.cpus.present),
                memory: n.memory.clone(),
            })
            .collect();
        Machine {
            discovered: true,
            nodes,
        }
    }

    /// All CPUs of the machine.
    pub fn cpus(&self) -> CpuSet {
        self.nodes
            .iter()
            .fold(CpuSet::new(), |acc, n| acc.union(&n.cpus))
    }

    /// The node that holds `cpu`.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(cpu))
            .map(|n| n.id)
    }

    /// The nodes whose memory `range` touches.
    pub fn nodes_of_range(&self, range: &MemRange) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|n| n.memory.iter().any(|m| m.overlaps(range)))
            .map(|n| n.id)
            .collect()
    }

    /// The nodes `cpus` sit on, ascending, without repeats.
    pub fn nodes_of_cpus(&self, cpus: &CpuSet) -> Vec<u32> {
        let mut v: Vec<u32> = cpus.iter().filter_map(|c| self.node_of_cpu(c)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Total memory of all nodes.
    pub fn memory_total(&self) -> u64 {
        self.nodes
            .iter()
            .flat_map(|n| &n.memory)
            .map(MemRange::size)
            .sum()
    }
}

/// One NUMA node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Node {
    pub id: u32,
    pub cpus: CpuSet,
    pub memory: Vec<MemRange>,
}

/// What the host kernel keeps for itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostShare {
    pub cpus: CpuSet,
    /// The least memory the host must keep outside the pool, if stated.
    pub memory: Option<ByteSize>,
}

/// The memory reserved for spawned kernels.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pool {
    pub range: MemRange,
    /// Every instance base and size is a multiple of this.
    pub align: ByteSize,
}

/// The shared window that links all kernels.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WindowSpec {
    pub size: ByteSize,
    /// Where it sits in the pool; only meaningful for the kexec backend
    /// (under QEMU the window is a file given to each guest as ivshmem).
    pub range: Option<MemRange>,
}

/// Where a kernel or initrd comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSpec {
    /// The project's default: the stock kernel `qemu/setup.sh` fetches, or
    /// the initramfs mkctl builds with `guest-init`.
    Auto,
    /// A file on the host (relative paths were resolved against the
    /// topology file's directory).
    Path(PathBuf),
    /// Another stock kernel `qemu/setup.sh` fetches (`kernel =
    /// "auto-6.12"`), a kernel only; serialized as that string.
    #[serde(untagged)]
    AutoSeries(KernelSeries),
}

impl ImageSpec {
    /// The stock kernel series this names, if it is one besides the default.
    pub fn series(&self) -> Option<KernelSeries> {
        match self {
            ImageSpec::AutoSeries(k) => Some(*k),
            ImageSpec::Auto | ImageSpec::Path(_) => None,
        }
    }
}

/// A stock kernel besides the default one: another build of Linux that
/// `qemu/setup.sh` fetches into a cache directory of its own, with the
/// modules the guests load from the initramfs built for it (a module loads
/// only in the release it was built for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum KernelSeries {
    /// Debian 12's 6.12 cloud kernel (`linux-image-6.12-cloud-amd64`).
    #[serde(rename = "auto-6.12")]
    V6_12,
}

impl KernelSeries {
    /// Every series, in the order errors list them.
    pub const ALL: [KernelSeries; 1] = [KernelSeries::V6_12];

    /// The Linux series: `6.12`.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelSeries::V6_12 => "6.12",
        }
    }

    /// How a topology asks for it: `auto-6.12`.
    pub fn spelling(self) -> String {
        format!("auto-{}", self.as_str())
    }

    /// The series a topology's `auto-<series>` names, if it is one.
    pub fn from_spelling(s: &str) -> Option<KernelSeries> {
        Self::ALL.into_iter().find(|k| k.spelling() == s)
    }
}

/// What the daemon does when an instance fails: `restart` and
/// `restart_limit` of its `[[instance]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "policy")]
pub enum Restart {
    /// It stays failed until someone restarts it (`restart = "no"`, the
    /// default).
    No,
    /// The daemon restarts it after a failure, at most `limit` (>= 1) times
    /// (`restart = "on-failure"`).
    OnFailure { limit: u32 },
}

impl Restart {
    /// The policy as the topology spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::No => "no",
            Restart::OnFailure { .. } => "on-failure",
        }
    }

    /// How many times the daemon may restart it; `None` without a policy.
    pub fn limit(self) -> Option<u32> {
        match self {
            Restart::No => None,
            Restart::OnFailure { limit } => Some(limit),
        }
    }
}

/// One spawned kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Instance {
    pub name: String,
    pub id: InstanceId,
    pub backend: Backend,
    pub cpus: CpuSet,
    pub memory: MemRange,
    /// True when the file gave `memory_base`; false when mkctl placed it.
    pub memory_base_given: bool,
    /// The NUMA node the instance is meant for (given, or that of its CPUs).
    pub numa_node: Option<u32>,
    pub kernel: ImageSpec,
    pub initrd: ImageSpec,
    pub cmdline: String,
    pub restart: Restart,
}

impl Instance {
    pub fn memory_size(&self) -> ByteSize {
        ByteSize(self.memory.size())
    }

    pub fn memory_base(&self) -> PhysAddr {
        self.memory.start
    }
}

impl Topology {
    pub fn instance(&self, name: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.name == name)
    }
}
