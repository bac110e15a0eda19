//! CPUs (`/sys/devices/system/cpu`), NUMA nodes (`/sys/devices/system/node`)
//! and memory blocks (`/sys/devices/system/memory`).

use std::io;

use super::{HostError, Root};
use crate::units::{ByteSize, CpuSet, MemRange};

/// The machine's logical CPUs as the kernel sees them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CpuInfo {
    /// CPUs the kernel could ever bring up (`cpu/possible`).
    pub possible: CpuSet,
    /// CPUs physically there (`cpu/present`; `possible` when unreadable).
    pub present: CpuSet,
    /// CPUs running the host kernel (`cpu/online`).
    pub online: CpuSet,
    /// Present but not online: the CPUs a spawned kernel can take without
    /// offlining anything first.
    pub offline: CpuSet,
    /// CPUs the kernel keeps out of scheduler domains (`cpu/isolated`:
    /// what `isolcpus=` did, as opposed to what the command line asked).
    pub isolated: CpuSet,
    /// Tickless CPUs (`cpu/nohz_full`; absent without `CONFIG_NO_HZ_FULL`).
    pub nohz_full: CpuSet,
}

impl CpuInfo {
    /// The highest possible CPU (what `N` means in a kernel cpulist).
    pub fn last_possible(&self) -> Option<u32> {
        self.possible.iter().last()
    }
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NumaNode {
    pub id: u32,
    pub cpus: CpuSet,
    /// The node's physical memory, from its memory blocks (adjacent blocks
    /// merged), ascending. Blocks that are offline are included.
    pub memory: Vec<MemRange>,
    /// The part of `memory` whose blocks are offline.
    pub offline_memory: Vec<MemRange>,
    /// `MemTotal` of the node's `meminfo` (memory the kernel manages there).
    pub mem_total: Option<ByteSize>,
}

const CPU_DIR: &str = "sys/devices/system/cpu";
const NODE_DIR: &str = "sys/devices/system/node";
const MEMORY_DIR: &str = "sys/devices/system/memory";

pub(super) fn read_cpus(root: &Root, warnings: &mut Vec<String>) -> Result<CpuInfo, HostError> {
    let essential = |name: &str| -> Result<CpuSet, HostError> {
        let rel = format!("{CPU_DIR}/{name}");
        let text = root.read_essential(&rel)?;
        CpuSet::parse(&text).map_err(|message| HostError::Parse {
            path: root.path(&rel),
            message,
        })
    };
    let online = essential("online")?;
    let possible = essential("possible")?;
    if online.is_empty() {
        return Err(HostError::Parse {
            path: root.path(&format!("{CPU_DIR}/online")),
            message: "no CPU is online".into(),
        });
    }
    let present = root
        .read_cpuset(&format!("{CPU_DIR}/present"), warnings, true)
        .unwrap_or_else(|| possible.clone());
    let isolated = root
        .read_cpuset(&format!("{CPU_DIR}/isolated"), warnings, false)
        .unwrap_or_default();
    let nohz_full = root
        .read_cpuset(&format!("{CPU_DIR}/nohz_full"), warnings, false)
        .unwrap_or_default();
    let offline = present.difference(&online);
    Ok(CpuInfo {
        possible,
        present,
        online,
        offline,
        isolated,
        nohz_full,
    })
}

/// Reads the NUMA nodes. Without `/sys/devices/system/node` (a kernel built
/// without `CONFIG_NUMA`) the machine is one node 0 holding every present
/// CPU and `ram` (or, when that is unknown, every memory block).
pub(super) fn read_nodes(
    root: &Root,
    cpus: &CpuInfo,
    ram: &[MemRange],
    mem_total: ByteSize,
    warnings: &mut Vec<String>,
) -> Vec<NumaNode> {
    let block_size = read_block_size(root, warnings);
    let node_dir = root.path(NODE_DIR);
    let ids = match numbered_entries(&node_dir, "node") {
        Ok(ids) => ids,
        Err(e) => {
            if e.kind() == io::ErrorKind::NotFound {
                warnings.push(format!(
                    "no {} (kernel without CONFIG_NUMA): one node 0 with all CPUs and RAM",
                    node_dir.display()
                ));
            } else {
                warnings.push(format!(
                    "{}: one node 0 with all CPUs and RAM",
                    super::unreadable(&node_dir, &e)
                ));
            }
            let (memory, offline_memory) = if ram.is_empty() {
                let all = numbered_entries(&root.path(MEMORY_DIR), "memory").unwrap_or_default();
                block_ranges(root, &all, block_size)
            } else {
                (ram.to_vec(), Vec::new())
            };
            return vec![NumaNode {
                id: 0,
                cpus: cpus.present.clone(),
                memory,
                offline_memory,
                mem_total: Some(mem_total),
            }];
        }
    };
    let bs_path = root.path(&format!("{MEMORY_DIR}/block_size_bytes"));
    if block_size.is_none() && !bs_path.exists() {
        // Without memory blocks (no CONFIG_MEMORY_HOTPLUG) sysfs does not say
        // which memory a node has.
        warnings.push(format!(
            "no {}: node memory ranges unknown",
            bs_path.display()
        ));
    }
    let mut nodes = Vec::new();
    for id in ids {
        let dir = format!("{NODE_DIR}/node{id}");
        let node_cpus = match root.read_cpuset(&format!("{dir}/cpulist"), warnings, true) {
            Some(c) => c,
            None => {
                CpuSet::from_cpus(numbered_entries(&root.path(&dir), "cpu").unwrap_or_default())
            }
        };
        let blocks = numbered_entries(&root.path(&dir), "memory").unwrap_or_default();
        let (memory, offline_memory) = match block_size {
            Some(_) => block_ranges(root, &blocks, block_size),
            None => (Vec::new(), Vec::new()),
        };
        let mem_total = root
            .read_optional(&format!("{dir}/meminfo"), warnings, "node MemTotal unknown")
            .and_then(|t| super::procfs::parse_meminfo(&t).get("MemTotal").copied())
            .map(ByteSize);
        nodes.push(NumaNode {
            id,
            cpus: node_cpus,
            memory,
            offline_memory,
            mem_total,
        });
    }
    nodes
}

/// `memory/block_size_bytes` (hex without `0x`); `None` when there are no
/// memory blocks (a kernel without `CONFIG_MEMORY_HOTPLUG`).
fn read_block_size(root: &Root, warnings: &mut Vec<String>) -> Option<u64> {
    let rel = format!("{MEMORY_DIR}/block_size_bytes");
    let text = match root.read(&rel) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warnings.push(format!(
                "{}: node memory ranges unknown",
                super::unreadable(&root.path(&rel), &e)
            ));
            return None;
        }
    };
    let t = text.trim();
    match u64::from_str_radix(t.trim_start_matches("0x"), 16) {
        Ok(bs) if bs > 0 => Some(bs),
        _ => {
            warnings.push(format!(
                "{}: \"{t}\" is not a hex block size: node memory ranges unknown",
                root.path(&rel).display()
            ));
            None
        }
    }
}

/// The merged ranges of memory blocks `ids`, and of those of them that are
/// offline (`memoryN/state`).
fn block_ranges(
    root: &Root,
    ids: &[u32],
    block_size: Option<u64>,
) -> (Vec<MemRange>, Vec<MemRange>) {
    let Some(bs) = block_size else {
        return (Vec::new(), Vec::new());
    };
    let offline: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|n| {
            root.read(&format!("{MEMORY_DIR}/memory{n}/state"))
                .is_ok_and(|s| s.trim() == "offline")
        })
        .collect();
    (merge_blocks(ids, bs), merge_blocks(&offline, bs))
}

/// Block `n` covers `[n*bs, (n+1)*bs)`; consecutive blocks become one range.
pub(super) fn merge_blocks(ids: &[u32], block_size: u64) -> Vec<MemRange> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<MemRange> = Vec::new();
    for n in ids {
        let Some(r) = u64::from(n)
            .checked_mul(block_size)
            .and_then(|start| MemRange::new(start, block_size))
        else {
            continue;
        };
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// The numbers `N` of entries named `<prefix>N` in `dir`, ascending.
fn numbered_entries(dir: &std::path::Path, prefix: &str) -> io::Result<Vec<u32>> {
    let mut ids: Vec<u32> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let digits = name.to_str()?.strip_prefix(prefix)?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_merge_into_ranges() {
        let g = 1u64 << 30;
        assert_eq!(
            merge_blocks(&[5, 0, 1, 4, 1], g),
            [
                MemRange::new(0, 2 * g).unwrap(),
                MemRange::new(4 * g, 2 * g).unwrap()
            ]
        );
        assert!(merge_blocks(&[], g).is_empty());
        // A block past 2^64 is dropped instead of wrapping.
        assert!(merge_blocks(&[u32::MAX], 1 << 40).is_empty());
    }
}
