//! The human report of `mkctl host`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{HostInfo, MemmapKind};
use crate::units::{ByteSize, CpuSet, MemRange};

pub(super) fn render(h: &HostInfo) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "host {}{}",
        h.sysroot.display(),
        h.kernel_release
            .as_ref()
            .map(|r| format!(" (kernel {r})"))
            .unwrap_or_default()
    );

    let c = &h.cpus;
    let _ = writeln!(
        o,
        "cpus      online {} ({} of {} present), offline {}, possible {}",
        dash(&c.online),
        c.online.len(),
        c.present.len(),
        dash(&c.offline),
        dash(&c.possible)
    );
    let _ = writeln!(
        o,
        "          isolated {}, nohz_full {}",
        dash(&c.isolated),
        dash(&c.nohz_full)
    );
    let _ = writeln!(o, "apic ids  {}", apic_runs(&h.apic_ids));
    let ram_total: u64 = h.ram.iter().map(MemRange::size).sum();
    let _ = writeln!(
        o,
        "memory    MemTotal {}; System RAM {}",
        h.mem_total.human(),
        if h.iomem_hidden {
            "unknown (addresses hidden: run as root)".to_string()
        } else if h.ram.is_empty() {
            "unknown".to_string()
        } else {
            format!(
                "{} in {} range(s)",
                ByteSize(ram_total).human(),
                h.ram.len()
            )
        }
    );

    let _ = writeln!(o, "\nnuma nodes");
    for n in &h.nodes {
        let size: u64 = n.memory.iter().map(MemRange::size).sum();
        let _ = writeln!(
            o,
            "  node {:<3} cpus {:<12} memory {}{}",
            n.id,
            dash(&n.cpus),
            if n.memory.is_empty() {
                "unknown".to_string()
            } else {
                format!("{} {}", ByteSize(size).human(), ranges(&n.memory))
            },
            n.mem_total
                .map(|t| format!(", MemTotal {}", t.human()))
                .unwrap_or_default()
        );
        if !n.offline_memory.is_empty() {
            let _ = writeln!(o, "           offline memory {}", ranges(&n.offline_memory));
        }
    }

    if !h.ram.is_empty() {
        let _ = writeln!(o, "\nsystem ram");
        for r in &h.ram {
            let _ = writeln!(
                o,
                "  {:<36} {:>8}",
                r.to_string(),
                ByteSize(r.size()).human()
            );
        }
    }
    let _ = writeln!(o, "\nreserved");
    if h.reserved.is_empty() {
        let _ = writeln!(o, "  none found");
    }
    for r in &h.reserved {
        let mut from = Vec::new();
        if let Some(n) = &r.iomem {
            from.push(format!("iomem \"{n}\""));
        }
        if let Some(c) = &r.cmdline {
            from.push(c.clone());
        }
        let _ = writeln!(
            o,
            "  {:<36} {:>8}  {:<17} {}",
            r.range.to_string(),
            ByteSize(r.range.size()).human(),
            r.kind.as_str(),
            from.join(", ")
        );
    }
    let pool = h.free_pool_candidates();
    if !pool.is_empty() {
        let _ = writeln!(o, "  pool candidates: {}", ranges(&pool));
    }

    let _ = writeln!(o, "\nkernel command line");
    let cl = &h.cmdline;
    let mut any = false;
    for m in &cl.memmap {
        any = true;
        let what = match m.kind {
            MemmapKind::ExactMap => "firmware map replaced".to_string(),
            MemmapKind::Ram { range } => format!("usable RAM {range}"),
            MemmapKind::AcpiData { range } => format!("ACPI data {range}"),
            MemmapKind::Reserved { range } => format!("reserved {range}"),
            MemmapKind::Persistent { range } => format!("persistent memory {range}"),
            MemmapKind::Retype { range, from, to } => format!(
                "retype {range} from {} to {}",
                from.map_or("any".into(), |t| t.to_string()),
                to.map_or("removed".into(), |t| t.to_string())
            ),
            MemmapKind::Limit { max } => format!("RAM limited to {max}"),
        };
        let _ = writeln!(o, "  {:<32} {what}", m.text);
    }
    if !cl.isolcpus.is_empty() {
        any = true;
        let flags = if cl.isolcpus_flags.is_empty() {
            "domain (implied)".to_string()
        } else {
            cl.isolcpus_flags.join(",")
        };
        let _ = writeln!(o, "  isolcpus {} (flags {flags})", cl.isolcpus);
    }
    if !cl.nohz_full.is_empty() {
        any = true;
        let _ = writeln!(o, "  nohz_full {}", cl.nohz_full);
    }
    for ck in &cl.crashkernel {
        any = true;
        let _ = writeln!(o, "  {}", ck.text);
    }
    if let Some(p) = &cl.mkkernel_pool {
        any = true;
        let _ = writeln!(
            o,
            "  {} ({})",
            p.text,
            p.range()
                .map_or("placed by the kernel".into(), |r| r.to_string())
        );
    }
    if !any {
        let _ = writeln!(
            o,
            "  no memmap=, isolcpus=, nohz_full=, crashkernel= or mkkernel_pool="
        );
    }

    let mk = &h.multikernel;
    let _ = writeln!(o, "\nmultikernel");
    if mk.present {
        let _ = writeln!(
            o,
            "  {}: present, {}, interface generation {}",
            super::multikernel::MOUNT_POINT,
            match (&mk.other_mount, mk.mounted) {
                (Some(t), _) => format!("{t} mounted on it"),
                (None, true) => "mounted".to_string(),
                (None, false) => "not mounted".to_string(),
            },
            mk.generation.map_or("unknown".to_string(), |g| format!(
                "{} ({})",
                g.as_str(),
                g.evidence()
            ))
        );
        if mk.instances.is_empty() {
            let _ = writeln!(o, "  instances: none");
        }
        for i in &mk.instances {
            let _ = writeln!(
                o,
                "  instance {:<16} id {:<4} {}",
                i.name,
                i.id.map_or("?".into(), |v| v.to_string()),
                i.status.as_deref().unwrap_or("?")
            );
        }
    } else {
        let _ = writeln!(o, "  {}: absent", super::multikernel::MOUNT_POINT);
    }
    let kc = &h.kernel_config;
    let _ = writeln!(
        o,
        "  CONFIG_MULTIKERNEL={}{}, CONFIG_KEXEC_FILE={} ({})",
        kc.multikernel,
        if kc.multikernel_inferred {
            " (inferred from /proc/filesystems)"
        } else {
            ""
        },
        kc.kexec_file,
        kc.source
            .as_ref()
            .map_or("no readable kernel config".into(), |p| format!(
                "from {}",
                p.display()
            ))
    );
    let _ = writeln!(o, "\n{}", h.kexec);

    if !h.warnings.is_empty() {
        let _ = writeln!(o, "\nwarnings");
        for w in &h.warnings {
            let _ = writeln!(o, "  {w}");
        }
    }
    o
}

fn dash(c: &CpuSet) -> String {
    if c.is_empty() {
        "-".into()
    } else {
        c.to_string()
    }
}

fn ranges(r: &[MemRange]) -> String {
    r.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cpu 0-3 -> apic 0-3, cpu 4-7 -> apic 8-11`: runs where both numbers
/// step by one.
pub(super) fn apic_runs(map: &BTreeMap<u32, u32>) -> String {
    if map.is_empty() {
        return "unknown".into();
    }
    let mut runs: Vec<(u32, u32, u32)> = Vec::new(); // (cpu lo, apic lo, len)
    for (&cpu, &apic) in map {
        match runs.last_mut() {
            Some((c, a, n))
                if c.checked_add(*n) == Some(cpu) && a.checked_add(*n) == Some(apic) =>
            {
                *n += 1
            }
            _ => runs.push((cpu, apic, 1)),
        }
    }
    runs.iter()
        .map(|&(c, a, n)| {
            if n == 1 {
                format!("cpu {c} -> apic {a}")
            } else {
                format!("cpu {c}-{} -> apic {a}-{}", c + n - 1, a + n - 1)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_runs_compact() {
        let m = BTreeMap::from([(0, 0), (1, 1), (2, 2), (3, 3), (4, 8), (5, 9), (7, 10)]);
        assert_eq!(
            apic_runs(&m),
            "cpu 0-3 -> apic 0-3, cpu 4-5 -> apic 8-9, cpu 7 -> apic 10"
        );
        assert_eq!(apic_runs(&BTreeMap::new()), "unknown");
    }
}
