//! The allocation report of a validated topology: per instance (CPUs, memory
//! range, node, backend) and per NUMA node (CPUs and pool memory used, with
//! utilisation). Read-only: it computes and prints, it never allocates.

use std::fmt::Write as _;

use serde::Serialize;

use crate::topology::{Backend, Topology};
use crate::units::{ByteSize, CpuSet, MemRange};

/// What `mkctl plan` shows, also serialised for `--json`.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub file: String,
    pub machine_discovered: bool,
    pub host: HostRow,
    pub pool: PoolRow,
    pub window: WindowRow,
    pub instances: Vec<InstanceRow>,
    pub nodes: Vec<NodeRow>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct HostRow {
    pub cpus: CpuSet,
    pub memory_outside_pool: ByteSize,
}

#[derive(Debug, Serialize)]
pub struct PoolRow {
    pub range: MemRange,
    pub size: ByteSize,
    pub used: ByteSize,
    pub free: ByteSize,
    pub align: ByteSize,
}

#[derive(Debug, Serialize)]
pub struct WindowRow {
    pub size: ByteSize,
    pub range: Option<MemRange>,
}

#[derive(Debug, Serialize)]
pub struct InstanceRow {
    pub name: String,
    pub id: u32,
    pub backend: Backend,
    pub cpus: CpuSet,
    pub cpu_count: usize,
    pub cpu_nodes: Vec<u32>,
    pub memory: MemRange,
    pub memory_size: ByteSize,
    pub memory_nodes: Vec<u32>,
    /// "given" when the file fixed the base, "placed" when mkctl chose it.
    pub placement: &'static str,
}

#[derive(Debug, Serialize)]
pub struct NodeRow {
    pub id: u32,
    pub cpus: CpuSet,
    pub cpus_host: CpuSet,
    pub cpus_instances: CpuSet,
    pub cpus_free: CpuSet,
    pub cpu_utilisation_pct: f64,
    pub memory: ByteSize,
    pub pool_on_node: ByteSize,
    pub pool_used: ByteSize,
    pub pool_utilisation_pct: f64,
}

fn overlap(a: &MemRange, b: &MemRange) -> u64 {
    let s = a.start.0.max(b.start.0);
    let e = a.end.0.min(b.end.0);
    e.saturating_sub(s)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        // Rounded to one decimal for people; exactness is not needed here.
        #[allow(clippy::cast_precision_loss)]
        let p = part as f64 * 100.0 / whole as f64;
        (p * 10.0).round() / 10.0
    }
}

impl Plan {
    pub fn new(t: &Topology) -> Self {
        let m = &t.machine;
        let inst_cpus = t
            .instances
            .iter()
            .fold(CpuSet::new(), |acc, i| acc.union(&i.cpus));
        let used: u64 = t.instances.iter().map(|i| i.memory.size()).sum::<u64>()
            + t.window.range.map_or(0, |r| r.size());
        let instances = t
            .instances
            .iter()
            .map(|i| InstanceRow {
                name: i.name.clone(),
                id: i.id.0,
                backend: i.backend,
                cpus: i.cpus.clone(),
                cpu_count: i.cpus.len(),
                cpu_nodes: m.nodes_of_cpus(&i.cpus),
                memory: i.memory,
                memory_size: i.memory_size(),
                memory_nodes: m.nodes_of_range(&i.memory),
                placement: if i.memory_base_given {
                    "given"
                } else {
                    "placed"
                },
            })
            .collect();
        let nodes = m
            .nodes
            .iter()
            .map(|n| {
                let host = n.cpus.intersection(&t.host.cpus);
                let taken = n.cpus.intersection(&inst_cpus);
                let free = n.cpus.difference(&host).difference(&taken);
                let pool_on: u64 = n.memory.iter().map(|r| overlap(r, &t.pool.range)).sum();
                let pool_used: u64 = t
                    .instances
                    .iter()
                    .map(|i| i.memory)
                    .chain(t.window.range)
                    .map(|r| n.memory.iter().map(|nr| overlap(nr, &r)).sum::<u64>())
                    .sum();
                NodeRow {
                    id: n.id,
                    cpus: n.cpus.clone(),
                    cpus_host: host,
                    cpus_instances: taken.clone(),
                    cpus_free: free,
                    cpu_utilisation_pct: pct(taken.len() as u64, n.cpus.len() as u64),
                    memory: ByteSize(n.memory.iter().map(MemRange::size).sum()),
                    pool_on_node: ByteSize(pool_on),
                    pool_used: ByteSize(pool_used),
                    pool_utilisation_pct: pct(pool_used, pool_on),
                }
            })
            .collect();
        Plan {
            file: t.source.path().display().to_string(),
            machine_discovered: m.discovered,
            host: HostRow {
                cpus: t.host.cpus.clone(),
                memory_outside_pool: ByteSize(m.memory_total().saturating_sub(t.pool.range.size())),
            },
            pool: PoolRow {
                range: t.pool.range,
                size: ByteSize(t.pool.range.size()),
                used: ByteSize(used),
                free: ByteSize(t.pool.range.size().saturating_sub(used)),
                align: t.pool.align,
            },
            window: WindowRow {
                size: t.window.size,
                range: t.window.range,
            },
            instances,
            nodes,
            warnings: t
                .warnings
                .iter()
                .map(|d| {
                    format!(
                        "{}: {}",
                        t.source.location(d.span.as_ref().map_or(0, |s| s.start)),
                        d.message
                    )
                })
                .collect(),
        }
    }

    /// The report for people.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "plan for {}{}",
            self.file,
            if self.machine_discovered {
                " (machine read from this host)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "host keeps CPUs {} and {} outside the pool",
            self.host.cpus,
            self.host.memory_outside_pool.human()
        );
        let _ = writeln!(
            o,
            "pool {} = {}, {} used, {} free, align {}",
            self.pool.range,
            self.pool.size.human(),
            self.pool.used.human(),
            self.pool.free.human(),
            self.pool.align
        );
        match self.window.range {
            Some(r) => {
                let _ = writeln!(o, "window {} at {r}", self.window.size);
            }
            None => {
                let _ = writeln!(o, "window {} (a shared file under qemu)", self.window.size);
            }
        }
        let _ = writeln!(o, "\ninstances");
        let _ = writeln!(
            o,
            "  {:<12} {:>4}  {:<7} {:<12} {:>4}  {:<6} {:<32} {:>7}  {:<6} HOW",
            "NAME", "ID", "BACKEND", "CPUS", "#", "NODES", "MEMORY", "SIZE", "MNODES"
        );
        for i in &self.instances {
            let _ = writeln!(
                o,
                "  {:<12} {:>4}  {:<7} {:<12} {:>4}  {:<6} {:<32} {:>7}  {:<6} {}",
                i.name,
                i.id,
                i.backend.as_str(),
                i.cpus.to_string(),
                i.cpu_count,
                join(&i.cpu_nodes),
                i.memory.to_string(),
                i.memory_size.human(),
                join(&i.memory_nodes),
                i.placement
            );
        }
        let _ = writeln!(o, "\nNUMA nodes");
        let _ = writeln!(
            o,
            "  {:<4} {:<10} {:<8} {:<12} {:<10} {:>6}  {:>7} {:>8} {:>8} {:>6}",
            "NODE", "CPUS", "HOST", "INSTANCES", "FREE", "CPU%", "MEMORY", "POOL", "USED", "POOL%"
        );
        for n in &self.nodes {
            let _ = writeln!(
                o,
                "  {:<4} {:<10} {:<8} {:<12} {:<10} {:>5.1}%  {:>7} {:>8} {:>8} {:>5.1}%",
                n.id,
                n.cpus.to_string(),
                dash(&n.cpus_host),
                dash(&n.cpus_instances),
                dash(&n.cpus_free),
                n.cpu_utilisation_pct,
                n.memory.human(),
                n.pool_on_node.human(),
                n.pool_used.human(),
                n.pool_utilisation_pct
            );
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(o, "\nwarnings");
            for w in &self.warnings {
                let _ = writeln!(o, "  {w}");
            }
        }
        o
    }
}

fn join(v: &[u32]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn dash(c: &CpuSet) -> String {
    if c.is_empty() {
        "-".into()
    } else {
        c.to_string()
    }
}
